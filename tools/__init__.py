"""The tools around the backend, kept out of the runtime: the demo, the benchmarks, the
accuracy sweep, training, and the models they run (TinyMoE and its checkpoints in data/,
tiny transformers MoE blocks). Their libraries are the [demo] and [bench] extras."""
