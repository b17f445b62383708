"""Training-free cleaning methods: each is one registered :class:`~harness.backbones.base.DenseModel`
subclass in one file. Most are a :class:`~harness.methods.last_block.LastBlockMethod` configuration."""
