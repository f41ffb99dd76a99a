"""MFU's denominator: the vendor's peak of exactly the card at hand, or none (then the trainer
measures the card's matmul peak). A PCIe or NVL card must not get its SXM sibling's figure."""

from __future__ import annotations

import pytest

from pangu.pretrain.metrics import KNOWN_PEAKS, known_peak


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM5
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H800", 989e12),
        ("NVIDIA H800 PCIe", 756e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A800-SXM4-80GB", 312e12),
        ("Tesla V100-PCIE-32GB", 112e12),
        ("Tesla V100-SXM2-32GB", 125e12),
    ],
)
def test_each_product_gets_its_own_vendor_peak(name, peak):
    assert known_peak(name) == peak


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA L40S",
        "NVIDIA B200",
        "NVIDIA H100",  # not a name a driver reports for a known product: measured, not guessed
        "NVIDIA H100 SXM5 94GB",
        "NVIDIA GeForce RTX 4090",
        "",
    ],
)
def test_an_unknown_name_gets_no_vendor_peak(name):
    """The trainer then measures the card's bf16 matmul peak instead of assuming a sibling's."""
    assert known_peak(name) is None


def test_a_part_of_a_known_card_gets_no_vendor_peak():
    """A MIG slice reports its card's name plus its profile and has a fraction of its compute:
    the whole name decides, so it is measured."""
    for name in KNOWN_PEAKS:
        assert known_peak(f"{name} MIG 1g.10gb") is None
