"""Using and judging a model: generation and token losses (inference.py), validation perplexity
(perplexity.py), and zero/few-shot tasks (tasks.py, prompts.py, scoring.py, harness.py; see
docs/evaluation.md):

    import pangu
    from pangu.evaluation.harness import evaluate_tasks
    model, tokenizer = pangu.load("runs/tiny")
    results = evaluate_tasks(model, ["sentiment"], tokenizer, config=config)
"""
