#!/bin/bash
# The two EC2 instance profiles cluster.yaml names, made once per AWS account with the AWS CLI,
# each with the least it needs:
#   cxr-tune-worker  S3 under one prefix of one bucket (trials upload checkpoints to --storage)
#   cxr-tune-head    the same S3 prefix, plus what Ray's autoscaler does with EC2: launch workers
#                    (with the worker profile only), tag them, list them, and start, stop or
#                    terminate instances tagged as this cluster's (ray-cluster-name=cxr-tune)
#
#   bash cluster/aws-iam.sh YOUR-BUCKET [PREFIX]          # create both; PREFIX default: cxr-tune
#   CXR_DRY_RUN=1 bash cluster/aws-iam.sh YOUR-BUCKET     # print the aws commands only
#
# Sweeps then take --storage s3://YOUR-BUCKET/PREFIX/RUN. `ray up` itself runs with your own
# credentials, which need more (security groups, key pairs): Ray's AWS guide lists them.
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

[[ $# -ge 1 && $# -le 2 && -n "$1" ]] || die "usage: bash cluster/aws-iam.sh BUCKET [PREFIX]"
bucket=$1
prefix=${2:-cxr-tune}
prefix=${prefix%/}
[[ "$prefix" =~ ^[A-Za-z0-9._/-]+$ && "$prefix" != /* ]] || die "PREFIX must be a plain S3 key prefix, got '$prefix'"
cluster=cxr-tune  # cluster.yaml's cluster_name: Ray tags every node with it

trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
s3=$(cat <<JSON
{"Version":"2012-10-17","Statement":[
 {"Effect":"Allow","Action":["s3:ListBucket"],"Resource":["arn:aws:s3:::$bucket"],
  "Condition":{"StringLike":{"s3:prefix":["$prefix/*"]}}},
 {"Effect":"Allow","Action":["s3:GetObject","s3:PutObject","s3:DeleteObject"],"Resource":["arn:aws:s3:::$bucket/$prefix/*"]}]}
JSON
)
ec2=$(cat <<JSON
{"Version":"2012-10-17","Statement":[
 {"Effect":"Allow","Action":["ec2:DescribeInstances","ec2:DescribeInstanceTypes","ec2:DescribeImages"],"Resource":"*"},
 {"Effect":"Allow","Action":["ec2:RunInstances","ec2:CreateTags"],"Resource":"*"},
 {"Effect":"Allow","Action":["ec2:StartInstances","ec2:StopInstances","ec2:TerminateInstances"],"Resource":"*",
  "Condition":{"StringEquals":{"ec2:ResourceTag/ray-cluster-name":"$cluster"}}},
 {"Effect":"Allow","Action":"ssm:GetParameters","Resource":"arn:aws:ssm:*::parameter/aws/service/deeplearning/*"},
 {"Effect":"Allow","Action":["iam:PassRole","iam:GetInstanceProfile"],
  "Resource":["arn:aws:iam::*:role/cxr-tune-worker","arn:aws:iam::*:instance-profile/cxr-tune-worker"]}]}
JSON
)
one_line() { tr -d '\n' <<<"$1"; }

for name in cxr-tune-worker cxr-tune-head; do
    run aws iam create-role --role-name "$name" --assume-role-policy-document "$trust"
    run aws iam put-role-policy --role-name "$name" --policy-name cxr-tune-s3 --policy-document "$(one_line "$s3")"
    run aws iam create-instance-profile --instance-profile-name "$name"
    run aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
done
# The head's autoscaler starts and stops the GPU workers, with the worker profile attached.
run aws iam put-role-policy --role-name cxr-tune-head --policy-name cxr-tune-autoscaler --policy-document "$(one_line "$ec2")"
