"""Servers on this machine: local server processes, the team stack, and the doctor's checks.

- servers.py: free ports, process groups, waiting for a server to answer (tests use it too)
- team.py: the team stack here: PostgreSQL + S3 (moto) + `mlflow server` with logins
- doctor.py: `mnistflow doctor`: server and version, login for reading and writing, artifacts

Imports store only (what a server's refusal means); nothing else in mnistflow imports this
package but cli/ (doctor) and the tests, benchmarks and scripts that start servers.
"""
