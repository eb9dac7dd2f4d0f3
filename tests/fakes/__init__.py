"""Fake upstreams for the tests. They live in proxy/demo so that `tether demo`
ships them; the package never imports from tests/."""

from proxy.demo.fake_openai import Call, FakeOpenAI, RawReply, Reply, completion, stream_events

__all__ = ["Call", "FakeOpenAI", "RawReply", "Reply", "completion", "stream_events"]
