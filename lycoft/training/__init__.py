"""Training OFT/BOFT adapters (`loop.train`, the engine of ``train_network.py``).

Rooms: flags and config files (`config`); data (`dataset_config`, `dataset`, `captions`, `buckets`,
`sampler`, `caching`, `toy_data`); the base model (`models`) and its text conditioning (`conditioning`);
one step's math (`noise`, `losses`); `optimizers`, `schedulers`; outputs (`saving`, `metadata`,
`sampling`, `tracking`); prior-preservation class images (`prior`); the recipe itself (`loop`) and its
optimizer steps (`step`).
Import the submodules directly; this package imports nothing heavy by itself so that flag parsing
stays fast."""
