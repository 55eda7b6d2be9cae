"""The deployment runtime: the planes over gRPC with mutual TLS, one process per party.

`transport` (servers, channels, streams, dialling with patience), `framing` (device chunks),
`node` (a plane on an asyncio loop, frames released by the simulator's link model), `evidence`
(audit log, refusals, checkpoints) and one module per role: `global_role`, `boundary_role`,
`device_role`.
"""
