"""The whole pipeline in one command: SFT, reward model, PPO at beta=1 and beta=0, evaluation, figures, report.

`toy-rlhf all` with the study called directly: the flags parsed (one-line errors, the run folder held),
then toy_rlhf.studies.main.run_all.
"""
from toy_rlhf.entry import quiet_edges

if __name__ == '__main__':
    with quiet_edges('toy_rlhf.studies.main') as study, study.flags() as (args, config):
        study.run_all(args.run_dir, args.plots_dir, config, args.progress)
