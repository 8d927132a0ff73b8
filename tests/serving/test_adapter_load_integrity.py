"""What the LLM replica's adapter loader refuses. `LLMServer` keeps one `AdapterStore` for its life and calls its
`get` (through `serve.multiplexed`) whenever a replica first loads an adapter, so one store object must refuse,
on the next load, a file changed after its checksum was recorded, a file added, and a folder the manifest does
not list, each with a message that says what differs."""
from __future__ import annotations

import asyncio
import shutil

import pytest

from adapters.integrity import IntegrityError
from adapters.registry import AdapterStore, UnknownAdapter
from tests.adapters.lora_helpers import make_store


def load(store: AdapterStore, adapter_id: str) -> str:
    """As the replica loads: off the event loop, the verified folder as a string."""
    return asyncio.run(asyncio.to_thread(lambda: str(store.get(adapter_id))))


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    """Two registered folders with the two files of a PEFT LoRA (the bytes need not be real weights here)."""
    return make_store(tmp_path / "store")


def test_a_file_changed_after_its_checksum_was_recorded_is_refused_at_the_next_load(store):
    assert load(store, "warm") == str(store.root / "warm")
    weights = store.root / "warm" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    with pytest.raises(IntegrityError, match=r"changed: adapter_model\.safetensors.*restore the files"):
        load(store, "warm")
    assert load(store, "calm") == str(store.root / "calm"), "one bad adapter does not block the others"


def test_a_file_added_to_a_registered_folder_is_refused(store):
    (store.root / "calm" / "extra_weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(IntegrityError, match=r"extra: extra_weights\.bin"):
        load(store, "calm")


def test_a_folder_the_manifest_does_not_list_is_refused_even_if_it_looks_like_an_adapter(store):
    shutil.copytree(store.root / "warm", store.root / "smuggled")
    with pytest.raises(UnknownAdapter, match=r"unknown adapter 'smuggled'; the store has \['calm', 'warm'\]"):
        load(store, "smuggled")
    with pytest.raises(UnknownAdapter):
        load(store, "../store/warm")


def test_the_ingress_reads_a_replica_refusal_as_adapter_refused():
    """The replica ends the stream with {"error": {"kind": "adapter_refused", ...}}; the ingress's RemoteEngine turns
    it into AdapterRefused naming the adapter, which the chat service withdraws from routing."""
    from serving.remote import RemoteEngine
    from serving.engine import AdapterRefused, GenerationRequest
    from serving.metrics import ServingMetrics

    class Gen:
        def __init__(self, items):
            self.items = items

        def __aiter__(self):
            return self._iter()

        async def _iter(self):
            for item in self.items:
                yield item

        def cancel(self):
            pass

    class Handle:
        def options(self, **kw):
            assert kw["multiplexed_model_id"] == "warm"
            return self

        @property
        def generate(self):
            return self

        def remote(self, request):
            return Gen([{"error": {"kind": "adapter_refused", "adapter_id": "warm",
                                   "message": "adapter 'warm': adapter_model.safetensors changed"}}])

    engine = RemoteEngine(Handle(), ServingMetrics())

    async def drain():
        req = GenerationRequest(request_id="r1", adapter_id="warm", adapter_path="/store/warm",
                                messages=[{"role": "user", "content": "hi"}],
                                max_tokens=4)
        return [t async for t in engine.stream(req)]

    with pytest.raises(AdapterRefused) as e:
        asyncio.run(drain())
    assert e.value.adapter_id == "warm" and "changed" in str(e.value)
