"""
Compatibility suites: the official provider SDKs against llmproxy's fakes
(and, through the proxy, against llmproxy itself).
"""
