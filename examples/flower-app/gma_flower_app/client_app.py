"""The ClientApp: trains the MLP on its node's partition (``partition-id`` of the node config)."""
from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from gma_flower_app.task import load_data, make_model, test, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    """Local training from the global arrays; replies with the new arrays and its loss."""
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = load_data(int(context.node_config["partition-id"]))
    cfg = context.run_config
    loss = train(model, data, epochs=int(cfg["local-epochs"]), lr=float(cfg["lr"]),
                 batch_size=int(cfg["batch-size"]))
    time.sleep(float(cfg["train-sleep"]))
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(data[1])})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """The global model's loss and accuracy on the node's test split."""
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = load_data(int(context.node_config["partition-id"]), test=True)
    loss, acc = test(model, data)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(data[1])})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
