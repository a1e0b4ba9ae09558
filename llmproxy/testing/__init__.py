"""
Test doubles shared by the unit tests, the end-to-end suites and the
benchmarks.

L{llmproxy.testing.fake_upstream} is a stand-in for the OpenAI, Anthropic and
Gemini HTTP APIs whose wire formats are checked against the official SDKs
(C{tests.compat}), so a test that passes against it passes for the reasons it
would against the real thing.
"""
