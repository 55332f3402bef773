"""minio-init on the S3 stand-in (moto): the bucket of docker-compose.yml, nothing else.

moto accepts any access key and enforces no policy, so the per-prefix users of stack/minio-init.sh
have no counterpart here; MLflow and DVC use their own keys all the same.
"""

import os
import time

import boto3

s3 = boto3.client("s3", endpoint_url="http://minio:9000", aws_access_key_id=os.environ["MINIO_ROOT_USER"],
                  aws_secret_access_key=os.environ["MINIO_ROOT_PASSWORD"], region_name="us-east-1")
bucket = os.environ["MINIO_BUCKET"]
for _attempt in range(30):
    try:
        existing = {b["Name"] for b in s3.list_buckets()["Buckets"]}
        break
    except Exception as error:  # the server is still starting
        print(f"s3-init: waiting for the S3 stand-in ({error})")
        time.sleep(1)
else:
    raise SystemExit("s3-init: the S3 stand-in did not answer")
if bucket not in existing:
    s3.create_bucket(Bucket=bucket)
print(f"s3-init: bucket {bucket} ready on the S3 stand-in (moto: no users or policies)")
