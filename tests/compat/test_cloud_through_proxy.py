"""
The cloud providers' official clients through the proxy to the fake
upstream: C{openai.AzureOpenAI}, boto3's C{bedrock-runtime},
C{anthropic.AnthropicVertex} and google-genai in Vertex mode, each checked
for what the client sees and for the exact tokens and cost of the cost
record the proxy writes.

C{tests.compat.test_cloud_fake_vs_sdks} proves the fake's shapes parse, so a
failure here is the proxy's.  The proxy runs in this process (its cost
records are caught in memory) and listens twice: plain HTTP, and TLS for
boto3, which sends a Bedrock API key only over HTTPS.  Mounts:

  - C{/azure/}: C{azure_openai} with a deployment map;
  - C{/bedrock/}: C{bedrock}, the client's credential passed through;
  - C{/bedrock-signed/}: C{bedrock} with C{aws_sigv4}: the proxy signs with
    its own credentials (the fake's test credential, from the environment)
    and the fake checks the signature;
  - C{/vertex/}: C{vertex}, the client's OAuth token passed through;
  - C{/vertex-adc/}: C{vertex} with C{google_adc}: the proxy's Application
    Default Credentials, refreshed against the fake's token endpoint.

Every expected cost is worked out by hand from the prices in L{PRICES}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import orjson
from botocore.exceptions import ClientError, EventStreamError
from treq.content import content
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from llmproxy.config import (
    Config,
    FeaturesConfig,
    Limits,
    ModelConfig,
    ModelPricing,
    Price,
    PriceTier,
    ProviderConfig,
    RateLimitConfig,
    RateLimitOverrides,
    Timeouts,
)
from llmproxy.eventstream import EventStreamDecoder, event_frame
from llmproxy.records import CostRecord
from llmproxy.sinks import ICostSink
from llmproxy.tap import build_service
from llmproxy.testing.fake_upstream import DEFAULT_CHUNKS, DEFAULT_INPUT_TOKENS, fake_text
from llmproxy.testing.fake_upstream.sigv4 import TEST_ACCESS_KEY, TEST_SECRET_KEY
from llmproxy.testing.fake_upstream.vertex import TOKEN_PREFIX
from tests.compat import cloud_clients
from tests.compat.cloud_clients import ANTHROPIC_BODY, BEDROCK_MODEL, CONVERSE_MESSAGES
from tests.e2e.harness import ProxyTestCase, RawClient, raw_request, reactor, split_response

IN = DEFAULT_INPUT_TOKENS
OUT = DEFAULT_CHUNKS
VERTEX_CLAUDE = "claude-sonnet-4@20250514"


def _price(input: float, output: float, cache_read: float, cache_write: float) -> ModelConfig:
    price = Price(input, output, cache_read, cache_write, output)
    return ModelConfig(pricing=ModelPricing(tiers=(PriceTier(0, price),)))


PRICES: dict[str, dict[str, ModelConfig]] = {
    "azure": {
        "gpt-4o": _price(2.50, 10.00, 1.25, 2.50),
        "text-embedding-3-small": _price(0.02, 0.0, 0.02, 0.02),
    },
    "bedrock": {BEDROCK_MODEL: _price(3.00, 15.00, 0.30, 3.75)},
    "vertex": {
        VERTEX_CLAUDE: _price(3.00, 15.00, 0.30, 3.75),
        "gemini-2.5-flash": _price(0.30, 2.50, 0.075, 0.30),
    },
}


def cost(input: int, output: int, price: ModelConfig, read: int = 0, write: int = 0) -> float:
    """
    The cost formula of docs/cost-tracking.md, by hand.
    """
    assert price.pricing is not None
    p = price.pricing.tiers[0].price
    return (
        (input - read - write) * p.input
        + read * p.cache_read
        + write * p.cache_write
        + output * p.output
    ) / 1e6


def complete_chunks(data: bytes) -> bytes:
    """
    The payload of the complete HTTP chunks at the start of a chunked body.
    """
    out = bytearray()
    at = 0
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            return bytes(out)
        size = int(data[at:line_end].split(b";")[0], 16)
        start = line_end + 2
        if size == 0 or start + size + 2 > len(data):
            return bytes(out)
        out += data[start : start + size]
        at = start + size + 2


@implementer(ICostSink)
class Records:
    """
    Catches the proxy's cost records in memory.
    """

    wants_records = True

    def __init__(self) -> None:
        self.records: list[CostRecord] = []

    def write(self, record: CostRecord) -> None:
        self.records.append(record)


class CloudProxyTestCase(ProxyTestCase):
    timeout = 60
    extra_features: FeaturesConfig | None = None

    def config(self, upstream_base: str) -> Config:
        base = super().config(upstream_base)
        timeouts = self.timeouts or Timeouts(
            connect_seconds=2, first_byte_seconds=5, idle_seconds=5
        )

        def mount(name: str, kind: str, prices: str, **extra: Any) -> ProviderConfig:
            return ProviderConfig(
                name=name,
                kind=kind,
                base_url=upstream_base,
                timeouts=timeouts,
                models=PRICES[prices],
                **extra,
            )

        providers = {
            **base.providers,
            "azure": mount(
                "azure",
                "azure_openai",
                "azure",
                deployments={"prod-chat": "gpt-4o", "embed": "text-embedding-3-small"},
            ),
            "bedrock": mount("bedrock", "bedrock", "bedrock", region="us-east-1"),
            "bedrock-signed": mount(
                "bedrock-signed", "bedrock", "bedrock", region="us-east-1", aws_sigv4=True
            ),
            "vertex": mount("vertex", "vertex", "vertex"),
            "vertex-adc": mount("vertex-adc", "vertex", "vertex", google_adc=True),
        }
        config = attrs.evolve(base, providers=providers)
        if self.extra_features is not None:
            config = attrs.evolve(config, features=self.extra_features)
        return config

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        # The proxy's own credentials: the fake's AWS test credential, and a
        # Google user credential refreshed against the fake's token endpoint
        # (written once the fake's port is known, in start_proxy).
        self.environ(
            AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        )
        self.tls = cloud_clients.tls_description(self.mktemp())
        yield super().setUp()

    def environ(self, **values: str) -> None:
        for name, value in values.items():
            previous = os.environ.get(name)
            os.environ[name] = value
            if previous is None:
                self.addCleanup(os.environ.pop, name, None)
            else:
                self.addCleanup(os.environ.__setitem__, name, previous)

    def start_proxy(self, config: Config, config_paths: Sequence[str] = ()) -> Deferred[None]:
        adc = self.mktemp()
        with open(adc, "w") as stream:
            json.dump(cloud_clients.service_account(self.upstream_url + "/oauth2/token"), stream)
        self.environ(GOOGLE_APPLICATION_CREDENTIALS=adc)
        self.service = build_service(
            reactor, config, config_paths, ["tcp:0:interface=127.0.0.1", self.tls]
        )
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.sink = Records()
        self.service._state.sink = self.sink
        plain: Any = self.service.ports[0].getHost()
        secure: Any = self.service.ports[1].getHost()
        self.proxy_port = plain.port
        self.proxy_url = f"http://127.0.0.1:{plain.port}"
        self.proxy_tls_url = f"https://127.0.0.1:{secure.port}"
        done: Deferred[None] = Deferred()
        done.callback(None)
        return done

    def in_thread(self, function: Callable[[], Any]) -> Deferred[Any]:
        result: Deferred[Any] = deferToThread(function)
        return result

    @inlineCallbacks
    def records(self, count: int = 1) -> Any:
        """
        The proxy's cost records, once there are C{count} of them (the
        record is written when the proxy's side of the call is over, which
        may be just after the client has its answer).
        """
        for _ in range(200):
            if len(self.sink.records) >= count:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(self.sink.records), count, self.sink.records)
        return self.sink.records

    def assert_record(
        self,
        record: CostRecord,
        *,
        provider: str,
        model: str,
        streaming: bool,
        input_tokens: int,
        output_tokens: int,
        total_cost: float,
        cache_read: int = 0,
        cache_write: int = 0,
        complete: bool = True,
        status: int = 200,
    ) -> None:
        self.assertEqual(
            (
                record.provider,
                record.model,
                record.is_streaming,
                record.status,
                record.complete,
                record.input_tokens,
                record.output_tokens,
                record.cache_read_tokens,
                record.cache_write_tokens,
            ),
            (
                provider,
                model,
                streaming,
                status,
                complete,
                input_tokens,
                output_tokens,
                cache_read,
                cache_write,
            ),
        )
        assert record.total_cost is not None, record
        self.assertAlmostEqual(record.total_cost, total_cost, places=12)


class AzureTests(CloudProxyTestCase):
    @inlineCallbacks
    def test_chat_stream_embeddings(self) -> Any:
        """
        Chat, streamed chat and embeddings through C{AzureOpenAI}: records
        name the deployment's model (C{gpt-4o}), not the deployment, with
        exact tokens and cost; the stream the client asked for carries no
        usage chunk (the proxy asked for one and removed it).
        """

        def call() -> list[Any]:
            with cloud_clients.azure(self.proxy_url + "/azure") as client:
                chat = client.chat.completions.create(
                    model="prod-chat",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-fake-cached-tokens": "4"},
                )
                chunks = list(
                    client.chat.completions.create(
                        model="prod-chat",
                        messages=[{"role": "user", "content": "hi"}],
                        stream=True,
                    )
                )
                vectors = client.embeddings.create(model="embed", input="x")
            return [chat, chunks, vectors]

        chat, chunks, vectors = yield self.in_thread(call)
        self.assertEqual(chat.choices[0].message.content, fake_text())
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks), fake_text())
        self.assertTrue(all(c.choices and c.usage is None for c in chunks))
        self.assertEqual(len(vectors.data), 1)
        first, second, third = yield self.records(3)
        gpt4o = PRICES["azure"]["gpt-4o"]
        self.assert_record(
            first,
            provider="azure",
            model="gpt-4o",
            streaming=False,
            input_tokens=IN,
            output_tokens=OUT,
            cache_read=4,
            total_cost=cost(IN, OUT, gpt4o, read=4),
        )
        self.assertEqual(first.endpoint, "/azure/openai/deployments/prod-chat/chat/completions")
        self.assertEqual(first.matched_model, "gpt-4o")
        self.assert_record(
            second,
            provider="azure",
            model="gpt-4o",
            streaming=True,
            input_tokens=IN,
            output_tokens=OUT,
            total_cost=cost(IN, OUT, gpt4o),
        )
        embed = PRICES["azure"]["text-embedding-3-small"]
        self.assertEqual(third.model, "text-embedding-3-small")
        assert third.total_cost is not None
        self.assertAlmostEqual(third.total_cost, cost(third.input_tokens, 0, embed), places=12)
        received = self.fake.received[0]
        self.assertEqual(received.header("api-key"), b"azure-key")
        self.assertTrue(
            received.uri.endswith(b"?api-version=" + cloud_clients.AZURE_API_VERSION.encode())
        )


class AzureLimitTests(CloudProxyTestCase):
    extra_features = FeaturesConfig(
        rate_limiting=RateLimitConfig(
            enabled=True,
            overrides=RateLimitOverrides(per_model={"gpt-4o": Limits(requests_per_minute=1)}),
        )
    )

    @inlineCallbacks
    def test_limits_use_the_mapped_model(self) -> Any:
        """
        Two deployments of the same model share its limit (the scope is
        C{model:gpt-4o}), and the refusal is OpenAI's error shape.
        """

        def call() -> Any:
            import openai

            with cloud_clients.azure(self.proxy_url + "/azure") as client:
                client.chat.completions.create(model="prod-chat", messages=[])
                with self.assertRaises(openai.RateLimitError) as caught:
                    client.chat.completions.create(model="prod-chat", messages=[])
                return caught.exception.response.headers

        headers = yield self.in_thread(call)
        self.assertEqual(headers["x-ratelimit-scope"], "model:gpt-4o")
        self.assertEqual(headers["x-llm-proxy-error-source"], "proxy")
        records = yield self.records(1)
        self.assertEqual(records[0].model, "gpt-4o")


class BedrockTests(CloudProxyTestCase):
    def signed(self) -> Any:
        """
        boto3 signing with credentials of its own: the proxy replaces them.
        """
        return cloud_clients.bedrock(
            self.proxy_url + "/bedrock-signed", access_key="AKIDCLIENT", secret_key="client-secret"
        )

    @inlineCallbacks
    def test_signed_by_the_proxy(self) -> Any:
        """
        Converse, ConverseStream, InvokeModel and its stream with the proxy
        signing for its own credential: the fake checks every signature,
        and every record has the exact tokens and cost.
        """

        def call() -> list[Any]:
            client = self.signed()
            cloud_clients.add_headers(
                client, {"x-fake-cached-tokens": "100", "x-fake-cache-write-tokens": "20"}
            )
            converse = client.converse(modelId=BEDROCK_MODEL, messages=CONVERSE_MESSAGES)
            stream = client.converse_stream(modelId=BEDROCK_MODEL, messages=CONVERSE_MESSAGES)
            events = list(stream["stream"])
            invoke = client.invoke_model(modelId=BEDROCK_MODEL, body=json.dumps(ANTHROPIC_BODY))
            invoked = json.loads(invoke["body"].read())
            streamed = client.invoke_model_with_response_stream(
                modelId=BEDROCK_MODEL, body=json.dumps(ANTHROPIC_BODY)
            )
            chunks = [json.loads(event["chunk"]["bytes"]) for event in streamed["body"]]
            return [converse, events, invoked, chunks]

        converse, events, invoked, chunks = yield self.in_thread(call)
        self.assertEqual(converse["output"]["message"]["content"][0]["text"], fake_text())
        deltas = [
            e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e
        ]
        self.assertEqual("".join(deltas), fake_text())
        self.assertEqual(invoked["content"][0]["text"], fake_text())
        self.assertEqual(chunks[-1]["type"], "message_stop")
        for received in self.fake.received:
            authorization = received.header("authorization") or b""
            self.assertIn(b"Credential=" + TEST_ACCESS_KEY.encode() + b"/", authorization)
        records = yield self.records(4)
        price = PRICES["bedrock"][BEDROCK_MODEL]
        total_in = IN + 100 + 20
        for record, streaming in zip(records, (False, True, False, True), strict=True):
            self.assert_record(
                record,
                provider="bedrock-signed",
                model=BEDROCK_MODEL,
                streaming=streaming,
                input_tokens=total_in,
                output_tokens=OUT,
                cache_read=100,
                cache_write=20,
                total_cost=cost(total_in, OUT, price, read=100, write=20),
            )
        self.assertEqual(
            [record.endpoint.rsplit("/", 1)[1] for record in records],
            ["converse", "converse-stream", "invoke", "invoke-with-response-stream"],
        )

    @inlineCallbacks
    def test_api_key_passes_through(self) -> Any:
        """
        A client's Bedrock API key (boto3 with C{AWS_BEARER_TOKEN_BEDROCK},
        over TLS) reaches the upstream unchanged and identifies the client.
        """

        def call() -> list[Any]:
            with cloud_clients.bedrock_api_key():
                client = cloud_clients.bedrock(self.proxy_tls_url + "/bedrock")
                converse = client.converse(modelId=BEDROCK_MODEL, messages=CONVERSE_MESSAGES)
                stream = client.converse_stream(
                    modelId=BEDROCK_MODEL,
                    messages=CONVERSE_MESSAGES,
                    inferenceConfig={"maxTokens": 2},
                )
                events = list(stream["stream"])
            return [converse, events]

        converse, events = yield self.in_thread(call)
        self.assertEqual(converse["usage"]["inputTokens"], IN)
        [metadata] = [e["metadata"] for e in events if "metadata" in e]
        self.assertEqual(metadata["usage"]["outputTokens"], 2)
        for received in self.fake.received:
            self.assertEqual(
                received.header("authorization"),
                b"Bearer " + cloud_clients.BEDROCK_API_KEY.encode(),
            )
        first, second = yield self.records(2)
        price = PRICES["bedrock"][BEDROCK_MODEL]
        self.assert_record(
            first,
            provider="bedrock",
            model=BEDROCK_MODEL,
            streaming=False,
            input_tokens=IN,
            output_tokens=OUT,
            total_cost=cost(IN, OUT, price),
        )
        self.assert_record(
            second,
            provider="bedrock",
            model=BEDROCK_MODEL,
            streaming=True,
            input_tokens=IN,
            output_tokens=2,
            total_cost=cost(IN, 2, price),
        )
        self.assertIsNotNone(first.key_id)
        self.assertEqual(first.key_id, second.key_id)

    @inlineCallbacks
    def test_burst_of_signed_streams(self) -> Any:
        """
        300 ConverseStream requests at once on the signing mount: each is
        signed (one credential lookup serves them all), each signature
        checks out at the fake, and each record has the exact usage.
        """
        count = 300
        body = orjson.dumps({"messages": CONVERSE_MESSAGES})
        path = self.proxy_url + "/bedrock-signed/model/" + BEDROCK_MODEL + "/converse-stream"

        @inlineCallbacks
        def one(index: int) -> Any:
            response = yield self.http.post(
                path,
                data=body,
                headers=Headers(
                    {
                        b"content-type": [b"application/json"],
                        b"x-fake-input-tokens": [b"%d" % index],
                    }
                ),
            )
            raw = yield content(response)
            return response.code, EventStreamDecoder().feed(raw)

        answers = yield gatherResults([one(index) for index in range(1, count + 1)])
        self.assertEqual({code for code, _ in answers}, {200})
        self.assertTrue(all(frames[-1].event_type == "metadata" for _, frames in answers))
        records = yield self.records(count)
        price = PRICES["bedrock"][BEDROCK_MODEL]
        by_input = sorted(records, key=lambda record: record.input_tokens)
        self.assertEqual(
            [(r.input_tokens, r.output_tokens) for r in by_input],
            [(index, OUT) for index in range(1, count + 1)],
        )
        for index, record in enumerate(by_input, start=1):
            assert record.total_cost is not None
            self.assertAlmostEqual(record.total_cost, cost(index, OUT, price), places=12)

    @inlineCallbacks
    def test_frames_arrive_before_the_upstream_finishes(self) -> Any:
        """
        The event stream is relayed frame by frame as the upstream writes
        it: the first frame reaches the client whole, long before the last.
        """
        body = orjson.dumps({"messages": CONVERSE_MESSAGES})
        headers = {
            b"authorization": b"Bearer " + cloud_clients.BEDROCK_API_KEY.encode(),
            b"content-type": b"application/json",
            b"x-fake-chunks": b"6",
            b"x-fake-delay-ms": b"150",
        }
        path = (
            b"/bedrock/model/" + BEDROCK_MODEL.encode().replace(b":", b"%3A") + b"/converse-stream"
        )
        client = RawClient(raw_request(b"POST", path, headers, body))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), client)
        raw = yield client.done
        status, response_headers, stream = split_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(response_headers[b"content-type"], [b"application/vnd.amazon.eventstream"])
        frames = EventStreamDecoder().feed(stream)
        self.assertEqual(frames[-1].event_type, "metadata")
        carrying = [chunk for chunk in client.chunks if b":event-type" in chunk.data]
        self.assertGreaterEqual(len(carrying), 6)
        self.assertGreater(carrying[-1].at - carrying[0].at, 0.6)
        # What had arrived when the first frame did decodes to whole frames:
        # the relay passes frames on as they come, never half of one first.
        upto = client.chunks.index(carrying[0]) + 1
        early = b"".join(chunk.data for chunk in client.chunks[:upto])
        early_frames = EventStreamDecoder().feed(complete_chunks(early.partition(b"\r\n\r\n")[2]))
        self.assertEqual(early_frames[0].event_type, "messageStart")
        self.assertLess(len(early_frames), len(frames))

    @inlineCallbacks
    def test_disconnect_meters_what_was_relayed(self) -> Any:
        """
        A client that leaves mid-stream: the record says incomplete and has
        the usage the relayed events reported (the input, from
        C{message_start}).
        """
        body = json.dumps(ANTHROPIC_BODY).encode()
        headers = {
            b"authorization": b"Bearer " + cloud_clients.BEDROCK_API_KEY.encode(),
            b"content-type": b"application/json",
            b"x-fake-chunks": b"50",
            b"x-fake-delay-ms": b"50",
        }
        path = b"/bedrock/model/" + BEDROCK_MODEL.encode() + b"/invoke-with-response-stream"
        client = RawClient(raw_request(b"POST", path, headers, body))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), client)
        # Two frames in (message_start and the first block), then away.
        while client.received.count(b":event-type") < 2:
            yield client.next_data()
        assert client.transport is not None
        client.transport.abortConnection()  # type: ignore[attr-defined]
        yield self.fake.wait_for_disconnect()
        [record] = yield self.records(1)
        self.assertFalse(record.complete)
        self.assertEqual(record.input_tokens, IN)
        self.assertEqual(record.model, BEDROCK_MODEL)
        self.assertTrue(record.is_streaming)


class BedrockErrorTests(CloudProxyTestCase):
    timeouts = Timeouts(connect_seconds=2, first_byte_seconds=5, idle_seconds=0.5)

    @inlineCallbacks
    def test_stream_stall_is_an_exception_event(self) -> Any:
        """
        An upstream that goes silent mid-stream: the proxy ends the stream
        with an exception frame boto3 raises, and records what came.
        """

        def call() -> Any:
            client = self.signed_client()
            cloud_clients.add_headers(client, {"x-fake-stall-after": "3"})
            stream = client.converse_stream(modelId=BEDROCK_MODEL, messages=CONVERSE_MESSAGES)
            with self.assertRaises(EventStreamError) as caught:
                list(stream["stream"])
            return caught.exception

        error = yield self.in_thread(call)
        self.assertEqual(error.response["Error"]["Code"], "modelStreamErrorException")
        self.assertIn("silent", error.response["Error"]["Message"])
        [record] = yield self.records(1)
        self.assertFalse(record.complete)

    def signed_client(self) -> Any:
        return cloud_clients.bedrock(self.proxy_url + "/bedrock-signed")

    @inlineCallbacks
    def test_proxy_errors_in_bedrock_shape(self) -> Any:
        """
        Errors the proxy makes are Bedrock's: boto3 raises them with the
        error code the proxy named.
        """
        yield self.service.stopService()
        unreachable = self.config("http://127.0.0.1:1")
        yield self.start_proxy(unreachable)

        def call() -> Any:
            with self.assertRaises(ClientError) as caught:
                self.signed_client().converse(modelId="m", messages=CONVERSE_MESSAGES)
            return caught.exception.response

        response = yield self.in_thread(call)
        self.assertEqual(response["Error"]["Code"], "InternalServerException")
        self.assertEqual(response["ResponseMetadata"]["HTTPStatusCode"], 502)
        self.assertIn("unreachable", response["Error"]["Message"])

    @inlineCallbacks
    def test_no_proxy_credentials(self) -> Any:
        """
        A signing mount whose AWS credential chain finds nothing: a 502
        in Bedrock's shape that says so, and nothing sent upstream.
        """
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            self.addCleanup(os.environ.__setitem__, name, os.environ.pop(name))

        def call() -> Any:
            with self.assertRaises(ClientError) as caught:
                self.signed_client().converse(modelId="m", messages=CONVERSE_MESSAGES)
            return caught.exception.response

        response = yield self.in_thread(call)
        self.assertEqual(response["ResponseMetadata"]["HTTPStatusCode"], 502)
        self.assertIn("(credentials)", response["Error"]["Message"])
        self.assertEqual(self.fake.received, [])

    @inlineCallbacks
    def test_malformed_event_stream(self) -> Any:
        """
        An upstream whose event stream turns to garbage: the bytes reach
        the client as they came (its SDK reports the damage), the proxy logs
        no traceback and still writes the record.
        """
        garbage = (
            event_frame("messageStart", b'{"role":"assistant"}')
            + b"\x00\x00\x01\x00not a frame" * 50000
        )
        upstream = _Raw(b"application/vnd.amazon.eventstream", garbage)
        port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.service.stopService()
        yield self.start_proxy(self.config(f"http://127.0.0.1:{port.getHost().port}"))

        def call() -> Any:
            with self.assertRaises(Exception) as caught:
                client = cloud_clients.bedrock(self.proxy_url + "/bedrock-signed")
                list(client.converse_stream(modelId="m", messages=CONVERSE_MESSAGES)["stream"])
            return caught.exception

        error = yield self.in_thread(call)
        self.assertIn("checksum", str(error).lower() + type(error).__name__.lower())
        [record] = yield self.records(1)
        self.assertEqual(record.status, 200)
        self.assertEqual(self.flushLoggedErrors(), [])


class _Raw(Resource):
    """
    An upstream that answers every request with one fixed body.
    """

    isLeaf = True

    def __init__(self, content_type: bytes, body: bytes) -> None:
        super().__init__()
        self._content_type = content_type
        self._body = body

    def render(self, request: Any) -> Any:
        request.setHeader(b"content-type", self._content_type)
        request.write(self._body)
        request.finish()
        return NOT_DONE_YET


class VertexTests(CloudProxyTestCase):
    @inlineCallbacks
    def test_anthropic_vertex(self) -> Any:
        def call() -> list[Any]:
            with cloud_clients.anthropic_vertex(self.proxy_url + "/vertex/v1") as client:
                message = client.messages.create(
                    model=VERTEX_CLAUDE,
                    max_tokens=100,
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-fake-cached-tokens": "6"},
                )
                with client.messages.stream(
                    model=VERTEX_CLAUDE,
                    max_tokens=100,
                    messages=[{"role": "user", "content": "hi"}],
                ) as stream:
                    text = "".join(stream.text_stream)
            return [message, text]

        message, text = yield self.in_thread(call)
        self.assertEqual(message.content[0].text, fake_text())
        self.assertEqual(text, fake_text())
        self.assertEqual(
            self.fake.received[0].header("authorization"), b"Bearer vertex-oauth-token"
        )
        first, second = yield self.records(2)
        price = PRICES["vertex"][VERTEX_CLAUDE]
        self.assert_record(
            first,
            provider="vertex",
            model=VERTEX_CLAUDE,
            streaming=False,
            input_tokens=IN + 6,
            output_tokens=OUT,
            cache_read=6,
            total_cost=cost(IN + 6, OUT, price, read=6),
        )
        self.assert_record(
            second,
            provider="vertex",
            model=VERTEX_CLAUDE,
            streaming=True,
            input_tokens=IN,
            output_tokens=OUT,
            total_cost=cost(IN, OUT, price),
        )

    @inlineCallbacks
    def test_genai_vertex(self) -> Any:
        def call() -> list[Any]:
            client = cloud_clients.genai_vertex(self.proxy_url + "/vertex")
            answer = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
            pieces = [
                chunk.text or ""
                for chunk in client.models.generate_content_stream(
                    model="gemini-2.5-flash", contents="hi"
                )
            ]
            return [answer, pieces]

        answer, pieces = yield self.in_thread(call)
        self.assertEqual(answer.text, fake_text())
        self.assertEqual("".join(pieces), fake_text())
        first, second = yield self.records(2)
        price = PRICES["vertex"]["gemini-2.5-flash"]
        for record, streaming in ((first, False), (second, True)):
            self.assert_record(
                record,
                provider="vertex",
                model="gemini-2.5-flash",
                streaming=streaming,
                input_tokens=IN,
                output_tokens=OUT,
                total_cost=cost(IN, OUT, price),
            )

    @inlineCallbacks
    def test_application_default_credentials(self) -> Any:
        """
        With C{google_adc}, the proxy replaces the client's token with its
        own, refreshed from its Application Default Credentials.
        """

        def call() -> Any:
            with cloud_clients.anthropic_vertex(self.proxy_url + "/vertex-adc/v1") as client:
                return client.messages.create(
                    model=VERTEX_CLAUDE, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
                )

        message = yield self.in_thread(call)
        self.assertEqual(message.usage.input_tokens, IN)
        token_request, claude = self.fake.received
        self.assertTrue(token_request.path.endswith(b"/oauth2/token"))
        self.assertTrue(
            (claude.header("authorization") or b"").startswith(b"Bearer " + TOKEN_PREFIX.encode())
        )
