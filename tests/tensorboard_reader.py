"""Reads scalar summaries back from TensorBoard event files (for tests), via TFRecord framing
and the tensorboardX protobufs — independent of the writer's code path."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2


def _records(path):
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            f.read(4)  # data crc
            yield data


def scalars(directory):
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for data in _records(path):
            event = event_pb2.Event.FromString(data)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
