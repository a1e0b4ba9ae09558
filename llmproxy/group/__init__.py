"""
Several worker processes behind one master (C{server.workers} above 1).

The master opens the listeners and never accepts on them: it hands the
listening sockets to its workers, which all accept on the same sockets and
each run the normal proxy service. State that must be exact across the
group lives once, in the master, behind a Unix socket in a private
directory; the workers reach it over one connection each.

  - L{llmproxy.group.channel}: the connection's framing (length, call id,
    kind, JSON body), calls both ways, replies matched by id;
  - L{llmproxy.group.stateservice}: the master's end, one handler per kind
    of state (the rate limiter's counters, L{llmproxy.ratelimit.remote};
    budgets' spend, L{llmproxy.budgets.remote}; circuit breaker state could
    be served the same way, with a kind of its own);
  - L{llmproxy.group.listeners}: the listening sockets, opened in the
    master, passed to the workers and adopted there;
  - L{llmproxy.group.master}: the master: starts, replaces, reloads and
    drains the workers, and is the process systemd talks to;
  - L{llmproxy.group.worker}: a worker's bootstrap;
  - L{llmproxy.group.view}: a worker's view of the whole group: each worker
    provides snapshots by name, and any worker can gather everyone's;
  - L{llmproxy.group.health}: C{/health} for the whole group from those
    snapshots.

Adding a page that must show the whole group (the status page): provide a
snapshot under a name of its own (C{view.provide("status", ...)}, next to
C{"health"} in L{llmproxy.group.worker}), then, when C{state.group} is set,
answer from C{state.group.gather("status")} merged the way
L{llmproxy.group.health} merges C{"health"}.
"""
