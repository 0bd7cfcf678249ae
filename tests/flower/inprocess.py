"""An in-process Grid for the Flower tests: messages go through Flower's real wire encoding."""

from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedmole.config import load_config

TINY = "configs/tiny.toml"
# three clients, one per tier, the smallest work that still trains and evaluates, and one torch
# thread (on a busy shared machine a descheduled second OpenMP thread makes steps ~10x slower)
SMALL = ["run.progress=false", "run.threads=1", "data.num_clients=3", "fed.tiers=[4,2,1]",
         "train.local_steps=2", "data.max_test=4", "eval.max_new_tokens=4"]


def small_cfg(*extra):
    return load_config(TINY, [*SMALL, *extra])


def wire(content: RecordDict) -> RecordDict:
    """`content` after a trip through Flower's protobuf encoding."""
    blob = recorddict_to_proto(content).SerializeToString()
    return recorddict_from_proto(ProtoRecordDict.FromString(blob))


class InProcessGrid(Grid):
    """Runs a ClientApp in this process for each message; one Context (node state) per node.

    Node ids are deliberately not in partition order, so the client <-> node map matters.
    """

    def __init__(self, client_app, node_configs: list[dict]):
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
        self.app = client_app
        run_id = uuid4().int >> 65  # every grid is a new Flower run, as every `flwr run` is
        self.contexts = {
            1000 - 7 * i: Context(run_id=run_id, node_id=1000 - 7 * i, node_config=dict(nc), state=RecordDict(),
                                  run_config={})
            for i, nc in enumerate(node_configs)
        }
        self.sent: list[Message] = []

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # what the real grids do on push
            self.sent.append(msg)
            delivered = Message(wire(msg.content), dst_node_id=msg.metadata.dst_node_id,
                                message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)
            delivered.metadata.__dict__["_message_id"] = msg.metadata.message_id
            reply = self.app(delivered, self.contexts[msg.metadata.dst_node_id])
            if not reply.has_error():
                reply = Message(wire(reply.content), reply_to=delivered)
            replies.append(reply)
        return replies
