"""Training: config and flags (`config`), datasets (`dataset`, `dataset_config`, `captions`, `buckets`,
`sampler`), encoder caches (`caching`), and the loop. Import the submodules directly; this package
imports nothing heavy by itself so that flag parsing stays fast."""
