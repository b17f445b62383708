"""Linear probes on frozen dense features: heads, losses, schedules, data, feature cache, training loop.

Two protocols share this code: the published recipe (DINOv2, Oquab et al., arXiv:2304.07193, as configured
in Jiawei-Yang/Denoising-ViT@82704df ``evaluation/configs``) and a cached-feature variant that records itself
as a different protocol:

* ``faithful`` -- online features with the DINOv2/DVT augmentations every iteration, one head,
  the published optimiser and schedule (comparable with DINOv2 / DVT / Registers tables);
* ``fast`` -- one fixed view per image, features cached once on disk in fp16, several heads (a small
  learning-rate grid) trained together on the cache, the best kept on a held-out part of train.
"""
