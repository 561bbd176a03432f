"""Set-up run in every worker process of a Ray this process starts (runtime_env's
`worker_process_setup_hook`). Kept tiny: every worker imports it at start."""
import logging

# Ray Train 2.60's placement-group cleaner asks the State API, which the dashboard serves, whether the
# training controller is alive; a local Ray without the dashboard has none, and the cleaner then warns
# once a second for the whole training (hundreds of lines per demo round). Its job, removing the
# placement group of a dead controller, is unchanged: only the warning is silenced.
NOISY = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_known_noise() -> None:
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
