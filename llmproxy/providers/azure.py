# -*- test-case-name: llmproxy.test.test_providers_azure -*-
"""
Azure OpenAI (C{kind: azure_openai}): the OpenAI wire format behind
Azure's paths, read and metered as OpenAI.

Paths: C{/openai/deployments/<deployment>/chat/completions?api-version=...}
(and C{completions}, C{embeddings}, ...), where the path names the
deployment; and the newer C{/openai/v1/chat/completions} (and
C{/openai/responses}), where the body's C{model} names it.  Either way the
name is an operator's deployment, not a model: C{deployments:
{<deployment>: <model>}} in the provider's configuration says which model
it runs, and that model is the request's model for limits, prices and
records, whatever the response body calls it (Azure reports its own
version names there).  A deployment the map does not name keeps its own
name as the request's model, and the response's model is used as for
OpenAI.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import evolve

from llmproxy.providers.format import RequestFacts
from llmproxy.providers.meters import Meter, Tally
from llmproxy.providers.openai import OpenAIFormat, describe_openai, openai_meter_for
from llmproxy.usage import Usage

ID_HEADERS: tuple[str, ...] = ("apim-request-id", "x-request-id")
"""Azure's gateway id first: it is the one Azure support asks for."""


def deployment_in(segments: list[str]) -> str | None:
    """
    The deployment a C{.../deployments/<deployment>/...} path names.
    """
    if "deployments" in segments[:-1]:
        return segments[segments.index("deployments") + 1] or None
    return None


class ModelNamedMeter(Meter):
    """
    A meter whose usage always names one model: the model a deployment
    runs, as configured.
    """

    def __init__(self, meter: Meter, model: str) -> None:
        self._meter = meter
        self._model = model

    def feed(self, data: bytes) -> bytes:
        return self._meter.feed(data)

    def finish(self) -> bytes:
        return self._meter.finish()

    def usage(self) -> Usage:
        return evolve(self._meter.usage(), model=self._model)


class AzureOpenAIFormat(OpenAIFormat):
    """
    Azure OpenAI, with the provider's deployment map.

    @ivar deployments: deployment name -> the model it runs.
    """

    kind = "azure_openai"
    id_headers = ID_HEADERS

    def __init__(self, deployments: Mapping[str, str]) -> None:
        self.deployments = dict(deployments)

    def describe(
        self, method: str, segments: list[str], query: bytes, body: object | None
    ) -> RequestFacts:
        facts = describe_openai(method, segments, body)
        # The path's deployment is what Azure routes by, whatever the body says.
        deployment = deployment_in(segments) or facts.model
        if deployment is None:
            return facts
        return evolve(facts, model=self.deployments.get(deployment, deployment))

    def meter_for(self, facts: RequestFacts, tally: Tally, sse: bool, strip: bool) -> Meter:
        meter = openai_meter_for(facts, tally, sse, strip)
        if facts.model is not None and facts.model in self.deployments.values():
            return ModelNamedMeter(meter, facts.model)
        return meter
