"""The machinery that makes placement fast, apart from the policy it serves: every cache the
core keeps, and every rule for bringing one up to date or forgetting it, lives here.

- `nodetable`: the snapshot's nodes as numpy columns, with a clock per row (`changed_since`)
  and the typed memos a table keeps between questions (`Memos`);
- `verdicts`: a policy's filters and scores over every node at once, cached per job shape on
  the table and brought up to date for the rows changed since;
- `islands`: each island's best gang per kind of job, kept until one of its nodes changes;
- `memos`: what one cycle remembers from job to job (misses, preemption candidates, ...),
  and the two events that end those answers (a bind, a preemption);
- `fits`: fits(node) for the reservation planner, read off the verdicts.

Policy (`core.plugins`, `core.placement`, `core.cycle`) asks questions of the engine. What it
memoises itself lives no longer than one cycle: a plugin instance `prepare` made for it
(frag-aware's losses, hbm-per-dollar's best value) and the cycle's `LeaseBlocks`.
"""
