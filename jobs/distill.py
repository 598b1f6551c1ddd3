"""`ray job submit` entrypoint: the same pipeline as `vdistill run`, inside the cluster's job driver.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/distill.py configs/k400_mtt_vpc1.yaml run.root=s3://bucket/runs

Ray sets RAY_ADDRESS for the job driver, so the coordinator actor starts on the cluster (and a
re-submission of the same run attaches to it or resumes from object storage).
"""
import sys

from vdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
