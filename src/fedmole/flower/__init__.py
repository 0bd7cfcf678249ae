"""fedmole on Flower: the same methods and round loop behind a ServerApp and a ClientApp.

    serde.py        Instruction / Reply / client state <-> Flower records
    strategy.py     node discovery and the per-node messages of one round
    server_app.py   FlowerEngine (LocalEngine's round loop over a Grid) and the ServerApp
    client_app.py   the ClientApp: train / evaluate / query handlers over a cached Setup
    simulation.py   `run.engine = "flower-sim"`: the Simulation Engine, one virtual node per client

Only these modules import `flwr`; the rest of fedmole runs without it
(install with `pip install -e .[flower]`). See docs/flower.md.
"""
