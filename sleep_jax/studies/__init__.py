"""Studies of the method: everything that runs an experiment.

The rule of the layout: `sleep_jax/` outside this package is the method and
what it is built from (model, CMS levels, wake, Knowledge Seeding, dreaming,
the wake/sleep lifecycle and its methods, training, sampling, checkpoints,
data pipelines). This package holds what *uses* the method to measure it:
the fact world (`facts`, `world_tfds`, `fact_world`: its people, its TFDS
dataset, its arrays and cached base model), results bookkeeping (`results`),
one module per study (`cms_recall`, `seeding`, `dreaming`, `continual`,
`knowledge`: each run by `python -m experiments.<study>` with
`experiments/configs/<study>.py`, its results on
`experiments/results/<study>.md`), their helpers (`continual_checks`: the
main job's config checks; `knowledge_setup`, `knowledge_rows`,
`knowledge_qa`, `knowledge_report`, `knowledge_plan`: the knowledge table
on SQuAD) and the main job's `report`.

The method never imports this package (tests/test_layout.py checks it).
"""
