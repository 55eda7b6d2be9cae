"""The audit surface: hash-chained, signed logs of every cross-boundary message, and their verifier.

`AuditLog` writes one party's log (`echelon.audit.log`); `verify_run` and `verify_log`
(`echelon.audit.verify`) check them offline; `echelon audit RUN` prints the result. The record
format, the chain, the signatures and the checks are described in docs/audit.md.
"""
