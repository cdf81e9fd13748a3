"""Training entry points, one per stage: `accelerate launch -m train.<stage> --config configs/<preset>.toml`.

Each module is a thin `main(argv)` over the shared loop in `train.loop`, so tests can call it directly.
"""
