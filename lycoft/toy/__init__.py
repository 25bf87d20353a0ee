"""The toy world: procedural scenes, the small SD1 model pretrained on them (``builtin:toy-sd1``), and a
judge that scores its samples.

* `data`: scenes of one coloured shape at a named place, drawn deterministically from a seed, with
  captions such as ``"a red circle on the left"``.
* `judge`: a small CNN that reads shape, colour and place back from an image.
* `pretrain`: the recipe that trains the toy model (VAE, text encoder, UNet) on the scenes.
* `scoring`: sampling a model at fixed seeds and scoring the images with the judge.
"""
