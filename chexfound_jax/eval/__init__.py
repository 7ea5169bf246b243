"""Downstream evaluation: tasks over labelled shards, heads on the frozen backbone, metrics and reports.

tasks (label columns, policies, splits) -> data.classification (batches) -> probe (a bank of heads, one
per lr) -> loop (training, prediction) -> metrics (AUROC/AP with bootstrap CIs) -> reports; workflows
(probe, OOD), label_efficiency and predict tie them together for `python -m chexfound_jax.evaluate`.
"""
