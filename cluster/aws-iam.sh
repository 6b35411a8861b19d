#!/bin/bash
# The two EC2 instance profiles cluster.yaml names, made once per AWS account with the AWS CLI:
#   cxr-tune-worker  read/write on one S3 bucket (trials upload checkpoints to --storage s3://...)
#   cxr-tune-head    the same, plus launching the workers (EC2, and iam:PassRole on the worker role)
#
#   bash cluster/aws-iam.sh YOUR-BUCKET              # create both
#   CXR_DRY_RUN=1 bash cluster/aws-iam.sh YOUR-BUCKET  # print the aws commands only
set -euo pipefail

die() { echo "aws-iam.sh: error: $*" >&2; exit 2; }
run() {
    if [[ "${CXR_DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@" | sed 's/ $//'
        echo
    else
        "$@"
    fi
}

[[ $# -eq 1 && -n "$1" ]] || die "usage: bash cluster/aws-iam.sh BUCKET"
bucket=$1
trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
s3="{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":[\"s3:ListBucket\",\"s3:GetObject\",\"s3:PutObject\",\"s3:DeleteObject\"],\"Resource\":[\"arn:aws:s3:::$bucket\",\"arn:aws:s3:::$bucket/*\"]}]}"
pass='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iam:PassRole","Resource":"arn:aws:iam::*:role/cxr-tune-worker"}]}'

for name in cxr-tune-worker cxr-tune-head; do
    run aws iam create-role --role-name "$name" --assume-role-policy-document "$trust"
    run aws iam put-role-policy --role-name "$name" --policy-name cxr-tune-s3 --policy-document "$s3"
    run aws iam create-instance-profile --instance-profile-name "$name"
    run aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
done
# The head's autoscaler starts and stops the GPU workers, with the worker profile attached.
run aws iam attach-role-policy --role-name cxr-tune-head --policy-arn arn:aws:iam::aws:policy/AmazonEC2FullAccess
run aws iam put-role-policy --role-name cxr-tune-head --policy-name cxr-tune-pass-worker --policy-document "$pass"
