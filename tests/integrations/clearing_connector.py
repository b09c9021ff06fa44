"""A test double around the real connector for scenario 5 (blocks gone between lookup and
load): after a lookup that decided to load, the namespace is cleared, so the worker's load
in the next step finds nothing and must report load errors. Only the timing is forced;
the lookup, the decision, the load and vLLM's recompute are the real ones."""

from kvstore.integrations.vllm import KVStoreConnector


class ClearingConnector(KVStoreConnector):
    def _decide(self, tokens):
        decision = super()._decide(tokens)
        if decision.load_tokens:
            self._client.clear()
        return decision
