"""Zero/few-shot evaluation of pangu checkpoints on task files (see docs/evaluation.md).

    import pangu
    from pangu.evaluation import evaluate_tasks
    model, tokenizer = pangu.load("runs/tiny")
    results = evaluate_tasks(model, ["sentiment"], tokenizer, config=config)

Names are imported lazily: the `pangu` command builds its parser from this package and stays fast.
"""

_EXPORTS = {
    "evaluate_tasks": "harness",
    "build_eval_engine": "harness",
    "make_scorer": "harness",
    "Scorer": "scoring",
    "ModelScorer": "scoring",
    "EngineScorer": "scoring",
    "Task": "tasks",
    "TaskError": "tasks",
    "load_task": "tasks",
    "sample_shots": "tasks",
    "cmrc_scores": "metrics",
    "exact_match": "metrics",
    "f1_score": "metrics",
    "mixed_segmentation": "metrics",
    "wilson_interval": "metrics",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pangu.evaluation' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"pangu.evaluation.{_EXPORTS[name]}"), name)
