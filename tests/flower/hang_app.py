"""A ClientApp whose client 1 hangs in its local update (imported by the Ray actors, which is
what applies the hang there too)."""

import os
import time

from flwr.clientapp import ClientApp

from fedmole.algorithms.flame import Flame
from fedmole.flower import client_app as fedmole_app

HANG = float(os.environ.get("FEDMOLE_TEST_HANG", "60"))
honest_update = Flame.client_update


def _hanging_update(self, rt, instruction):
    if rt.client_id == 1:
        time.sleep(HANG)
    return honest_update(self, rt, instruction)


Flame.client_update = _hanging_update
app = ClientApp()


@app.train()
def train(message, context):
    return fedmole_app.train(message, context)


@app.evaluate()
def evaluate(message, context):
    return fedmole_app.evaluate(message, context)


@app.query()
def query(message, context):
    return fedmole_app.query(message, context)
