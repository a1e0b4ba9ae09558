# -*- test-case-name: llmproxy.test.test_fake_upstream -*-
"""
C{python -m llmproxy.testing.fake_upstream}: serve the fake upstream
standalone (see L{llmproxy.testing.fake_upstream.main}).
"""

from llmproxy.testing.fake_upstream import main

main()
