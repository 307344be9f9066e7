"""Create the digit service's read-only account on the tracking server (idempotent).

The server's default_permission is READ, so a new account may read every experiment and
model and change nothing.
"""

import base64
import json
import os
import sys
import urllib.error
import urllib.request

url = sys.argv[1].rstrip("/") + "/api/2.0/mlflow/users/create"
body = {"username": os.environ["MNISTFLOW_SERVE_USERNAME"],
        "password": os.environ["MNISTFLOW_SERVE_PASSWORD"]}
admin = base64.b64encode(f"admin:{os.environ['MLFLOW_ADMIN_PASSWORD']}".encode()).decode()
request = urllib.request.Request(
    url, data=json.dumps(body).encode(), method="POST",
    headers={"Content-Type": "application/json", "Authorization": f"Basic {admin}"},
)
try:
    urllib.request.urlopen(request, timeout=30)
    print(f"created the read-only user {body['username']!r}")
except urllib.error.HTTPError as e:
    if b"RESOURCE_ALREADY_EXISTS" not in e.read():
        raise
    print(f"the user {body['username']!r} exists already")
