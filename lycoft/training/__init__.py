"""Training OFT/BOFT adapters (`loop.train`, the engine of ``train_network.py``).

Rooms: the flag table (`flags`), what each flag's value may be (`flag_values`), kohya's flags lycoft
does not take (`kohya_flags`), config files in and out (`config_files`), cross-field rules (`validate`)
and the command line (`config`); data (`dataset_config`, `dataset`, `captions`, `buckets`, `sampler`,
`caching`); the base model (`models`, `fp8_base`) and its text conditioning (`conditioning`);
starting points (`warm_start`, `start_weights`); one step's math (`noise`, `losses`); `optimizers`,
`schedulers`; outputs (`saving`, `metadata`, `sampling`, `tracking`); prior-preservation class images
(`prior`); the recipe itself (`loop`), its optimizer steps (`step`) and the undo of a failed one
(`rollback`).
Import the submodules directly; this package imports nothing heavy by itself so that flag parsing
stays fast."""
