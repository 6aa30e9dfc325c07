"""The README's hello-world, verbatim, against a zero-config `strata serve`."""

import subprocess

import pytest

from conftest import Broker, port_is_free, python_exe

HELLO = """\
from kafka import KafkaProducer, KafkaConsumer
producer = KafkaProducer(bootstrap_servers='localhost:9092')
producer.send('my_topic', b'Hello, Kafka!'); producer.flush()
consumer = KafkaConsumer('my_topic', bootstrap_servers='localhost:9092',
                         auto_offset_reset='earliest', consumer_timeout_ms=10000)
for message in consumer:
    print('Received message: {}'.format(message.value.decode())); break
"""


def test_hello_world_zero_config(tmp_path, strata_bin):
    # zero config: Kafka on 127.0.0.1:9092 (hardcoded in the program), HTTP on 127.0.0.1:9644
    for port in (9092, 9644):
        if not port_is_free(port):
            pytest.skip(f"port {port} is in use on this machine; a zero-config broker needs it")
    b = Broker(tmp_path / "zero", zero_config=True, name="zero-config-broker", binary=strata_bin)
    try:
        b.start()
        script = tmp_path / "hello.py"
        script.write_text(HELLO)
        res = subprocess.run([python_exe(), str(script)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=90, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, f"hello.py failed ({res.returncode}):\n{res.stderr[-4000:]}"
        assert "Received message: Hello, Kafka!" in res.stdout, (
            f"stdout:\n{res.stdout}\nstderr:\n{res.stderr[-4000:]}")
        assert b.alive()
        # zero config keeps its data under ./data of the working directory
        assert b.data_dir.is_dir(), f"no ./data directory created in {b.cwd}"
    finally:
        b.close()
