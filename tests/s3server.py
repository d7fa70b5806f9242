"""A real S3 API server on 127.0.0.1 for the tests: moto's standalone server (`moto_server`, from the
test extras), with IAM checks on, so that refused credentials and a read-only grant answer as S3 does.

The first IAM_SETUP_CALLS requests go through unchecked (moto's INITIAL_NO_AUTH_ACTION_COUNT): they
create an admin user (s3:*) and a read-only user and their keys. Everything after is signed and checked.
The session's environment gets the admin keys and AWS_ENDPOINT_URL before Ray starts, so Ray's workers,
an MLflow server and pyarrow all find the store through the standard AWS chain.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BUCKET = "genrec-tests"
REGION = "us-east-1"
IAM_SETUP_CALLS = 6  # 2 users x (create_user, put_user_policy, create_access_key)
# moto maps a well-formed access key id to its default account; an unknown one would land in another
BOOTSTRAP_KEY = "AKIAIOSFODNN7EXAMPLE"


@dataclass
class S3Server:
    endpoint: str
    admin: tuple[str, str]
    reader: tuple[str, str]
    process: subprocess.Popen

    def env(self, keys: tuple[str, str] | None = None) -> dict:
        """The AWS variables a process needs to reach this store (admin keys unless others are given)."""
        key_id, secret = keys or self.admin
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, keys: tuple[str, str] | None = None):
        import boto3

        key_id, secret = keys or self.admin
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key_id, aws_secret_access_key=secret)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user(iam, name: str, actions: list[str]) -> tuple[str, str]:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def start(log_dir: Path) -> S3Server:
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = Path(sys.executable).with_name("moto_server")
    assert server.exists(), f"{server} missing: the test extras install moto[server]"
    log = open(log_dir / "moto_server.log", "w")
    process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(IAM_SETUP_CALLS)})
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto_server did not start; see {log_dir / 'moto_server.log'}")
            time.sleep(0.2)
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                       aws_access_key_id=BOOTSTRAP_KEY, aws_secret_access_key="bootstrap")
    admin = _user(iam, "genrec-admin", ["s3:*"])
    reader = _user(iam, "genrec-reader", ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"])
    s3 = S3Server(endpoint, admin, reader, process)
    s3.client().create_bucket(Bucket=BUCKET)
    return s3
