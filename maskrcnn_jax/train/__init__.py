"""Training: optimizer and schedule, mixed precision, train state, pmapped steps, checkpoints, loop.

  optimizer   SGD momentum, warmup + step decay, L2 on kernels, bias x2, frozen mask, clipping,
              gradient accumulation (the reference's recipe as one optax chain)
  precision   compute dtypes and the float16 dynamic loss scale
  state       TrainState (no RNG leaf: randomness is fold_in(key, step))
  step        per-device train / inference steps (axis 'batch'; pmap or shard_map)
  metrics     clu metrics collection of the train step
  checkpoint  Orbax CheckpointManager helpers (unreplicated state, abstract restore)
  loop        train / eval / train_and_eval, the only readers of the config besides main
"""
