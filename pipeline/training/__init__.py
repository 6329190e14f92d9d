"""The one training path of every stage that trains (pretrain stand-in, dense head, finetune, pseudo,
ensemble members), by concern; the stages compose these and write their outputs.

- ``optim``: ``TrainSettings`` and the one optimiser factory (layer-wise rates, the schedules).
- ``classifier``: the one LightningModule (it receives its network), the loss, staged unfreezing.
- ``trainer``: the one trainer factory and the one fit (fresh, resumed or reused), devices, DDP.
- ``checkpoint``: the one network file format; Lightning checkpoints, written atomically.
- ``resume``: the resume state machine (run fingerprint, ``last.ckpt`` within and between epochs,
  the sampler's position, the run's log).
- ``prediction``: probabilities on images or cached features (sharded over ranks), TTA.
- ``datamodules``: DataModules and batch samplers (images with pseudo-labels; cached features).
- ``tables``: the train/valid/test image tables every training stage reads.
- ``folds``: per-fold stages run for one fold or all; what a fold model may look at.
- Recipes: ``head`` (the dense head on cached features), ``fine_tuning`` (from the head),
  ``pseudo`` (pseudo-labels and students), ``members`` (ensemble members' seeds and rows),
  ``pretrain`` (the CPU stand-in for ImageNet weights).

Nothing is imported here: a module imports the ones it uses by their own name.
"""
