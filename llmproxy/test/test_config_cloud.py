"""
Tests for L{llmproxy.config.cloud}: the keys of the C{azure_openai},
C{bedrock} and C{vertex} kinds, with good and bad values.
"""

from __future__ import annotations

from llmproxy.config import cloud
from llmproxy.test.test_config import FilesMixin


class CloudKeyTests(FilesMixin):
    def test_bedrock_region(self) -> None:
        """
        A Bedrock provider needs only its region: the base URL follows.
        """
        config = self.load("providers:\n  bedrock: {kind: bedrock, region: eu-central-1}\n")
        provider = config.providers["bedrock"]
        self.assertEqual(provider.base_url, "https://bedrock-runtime.eu-central-1.amazonaws.com")
        self.assertEqual(provider.region, "eu-central-1")

    def test_vertex_region(self) -> None:
        config = self.load(
            "providers:\n  vx: {kind: vertex, region: us-central1}\n"
            "  vg: {kind: vertex, region: global}\n"
            "  vb: {kind: vertex, region: europe-west4, base_url: 'http://127.0.0.1:1'}\n"
        )
        self.assertEqual(
            config.providers["vx"].base_url, "https://us-central1-aiplatform.googleapis.com"
        )
        self.assertEqual(config.providers["vg"].base_url, "https://aiplatform.googleapis.com")
        self.assertEqual(config.providers["vb"].base_url, "http://127.0.0.1:1")

    def test_bad_regions(self) -> None:
        cases = {
            "{kind: bedrock, region: 'us east 1'}": "expected a region name",
            "{kind: bedrock, region: 42}": "expected a region name",
            "{kind: bedrock, region: us-central1}": "expected an AWS region such as 'us-east-1'",
            "{kind: vertex, region: us-east-1}": "expected a Google Cloud region",
            "{kind: vertex, region: 'evil.example.com/x'}": "expected a region name",
            "{kind: openai, base_url: 'http://h', region: us-east-1}": "expected no region for",
        }
        for entry, expected in cases.items():
            self.assertOneError(f"providers:\n  x: {entry}\n", "providers.x.region", expected)

    def test_region_or_base_url(self) -> None:
        self.assertOneError(
            "providers:\n  x: {kind: bedrock}\n",
            "providers.x.base_url",
            "expected an http(s) URL (required for a provider that is not built in, "
            "unless it gives a region), got nothing",
        )

    def test_deployments(self) -> None:
        config = self.load(
            "providers:\n  azure:\n    kind: azure_openai\n"
            "    base_url: https://res.openai.azure.com\n"
            "    deployments: {prod: gpt-4o, embed: text-embedding-3-small}\n"
        )
        self.assertEqual(
            dict(config.providers["azure"].deployments),
            {"prod": "gpt-4o", "embed": "text-embedding-3-small"},
        )

    def test_bad_deployments(self) -> None:
        head = "providers:\n  azure: {kind: azure_openai, base_url: 'https://r.openai.azure.com', "
        self.assertOneError(
            head + "deployments: [gpt-4o]}\n",
            "providers.azure.deployments",
            "expected a mapping of deployment name to settings",
        )
        self.assertOneError(
            head + "deployments: {prod: ''}}\n",
            "providers.azure.deployments.prod",
            "expected a non-empty string, got ''",
        )
        self.assertOneError(
            head + "deployments: {prod: {model: gpt-4o}}}\n",
            "providers.azure.deployments.prod",
            "expected a non-empty string",
        )
        self.assertOneError(
            "providers:\n  openai: {deployments: {a: b}}\n",
            "providers.openai.deployments",
            "expected no deployments for kind 'openai' (only 'azure_openai')",
        )

    def test_switches_belong_to_their_kind(self) -> None:
        self.assertOneError(
            "providers:\n  v: {kind: vertex, region: global, aws_sigv4: true}\n",
            "providers.v.aws_sigv4",
            "expected no aws_sigv4 for kind 'vertex' (only 'bedrock')",
        )
        self.assertOneError(
            "providers:\n  b: {kind: bedrock, region: us-east-1, google_adc: true}\n",
            "providers.b.google_adc",
            "expected no google_adc for kind 'bedrock' (only 'vertex')",
        )
        self.assertOneError(
            "providers:\n  b: {kind: bedrock, region: us-east-1, aws_sigv4: 'yes'}\n",
            "providers.b.aws_sigv4",
            "expected true or false, got 'yes'",
        )

    def test_sigv4_needs_a_region(self) -> None:
        """
        SigV4 signs for a region: one from C{region} or the Bedrock host.
        """
        self.assertOneError(
            "providers:\n  b: {kind: bedrock, base_url: 'http://127.0.0.1:9', aws_sigv4: true}\n",
            "providers.b.region",
            "aws_sigv4 signs for one AWS region",
        )
        config = self.load(
            "providers:\n  b: {kind: bedrock, aws_sigv4: true,"
            " base_url: 'https://bedrock-runtime.ap-south-1.amazonaws.com'}\n"
        )
        self.assertEqual(cloud.aws_region(config.providers["b"]), "ap-south-1")

    def test_missing_extra(self) -> None:
        """
        A switch whose library is not installed is an error that names the
        key and the extra to install.
        """
        self.patch(cloud, "importable", lambda module: False)
        error = self.assertOneError(
            "providers:\n  b: {kind: bedrock, region: us-east-1, aws_sigv4: true}\n",
            "providers.b.aws_sigv4",
            "needs botocore (not installed): pip install 'llmproxy[aws]'",
        )
        self.assertNotIn("got", error)
        self.assertOneError(
            "providers:\n  v: {kind: vertex, region: global, google_adc: true}\n",
            "providers.v.google_adc",
            "needs google.auth, requests (not installed): pip install 'llmproxy[gcp]'",
        )
        # Off, the switch needs nothing.
        self.load("providers:\n  b: {kind: bedrock, region: us-east-1, aws_sigv4: false}\n")
