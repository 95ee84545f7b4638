"""The run's dataset: read once per (settings, seed) on the host, moved to the device as one
pair of tensors whose consecutive slices are the clients."""
import torch

from fedsim.config import Config
from fedsim.data.cache import load_data, read_data


def test_read_data_is_cached_per_settings_and_seed(tiny):
    config = Config(**tiny)
    first = read_data(config, 0)
    assert read_data(Config(**{**tiny, "rounds": 7}), 0) is first  # rounds do not touch data
    other = read_data(config, 1)
    assert other is not first
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(other.clients, first.clients))
    assert read_data(Config(**{**tiny, "num_clients": 3}), 1) is not other


def test_load_data_gives_the_same_clients_as_consecutive_views(tiny):
    config = Config(**tiny)
    host, placed = read_data(config, 0), load_data(config, 0)
    assert len(placed.clients) == len(host.clients)
    base = placed.clients[0][0].untyped_storage().data_ptr()
    offset = 0
    for (x, y), (hx, hy) in zip(placed.clients, host.clients):
        assert torch.equal(x, hx) and torch.equal(y, hy)
        assert x.untyped_storage().data_ptr() == base  # one tensor for every client
        assert x.storage_offset() == offset
        offset += x[0].numel() * len(x)
    assert torch.equal(placed.test[0], host.test[0]) and torch.equal(placed.test[1], host.test[1])
