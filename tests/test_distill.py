"""On-policy distillation: the teacher's next-token distributions against its table, the divergences
against hand-computed values, and where the quick schedule lands against its exact teacher."""
import math

import pytest
import torch

from conftest import train_quickly

from mingpt.model import GPT
from toy_rlhf.enumeration import all_responses, all_response_log_probs, all_response_rewards, prompt_pool
from toy_rlhf.language import SEP, VOCAB_SIZE, sample_prompts
from toy_rlhf.methods import METHODS
from toy_rlhf.methods.distill import DistillConfig, divergence_loss, teacher_next_token
from toy_rlhf.methods.rollout import rollout
from toy_rlhf.optimal import exact_tables, expected_reward, objective, optimal_value, response_kl
from toy_rlhf.policy import policy_config
from toy_rlhf.preferences import PREFERENCES
from toy_rlhf.reward import reward_model_config
from toy_rlhf.training import TrainingError


def test_the_teachers_next_token_distributions_multiply_to_its_table():
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(3, 10 ** 4, dtype=torch.float64, generator=generator).log_softmax(dim=1)
    responses = all_responses()[torch.randint(10 ** 4, (3,), generator=generator)]  # (3, 4)
    log_ref_next = torch.randn(3, 4, VOCAB_SIZE, generator=generator).log_softmax(dim=-1)
    teacher = teacher_next_token(table, responses, log_ref_next)  # (3, 4, V)
    assert torch.allclose(teacher.exp().sum(dim=-1), torch.ones(3, 4), atol=1e-5)
    assert torch.equal(teacher[..., SEP], log_ref_next[..., SEP])  # SEP: the reference's
    # Renormalised over digits, the conditionals along a response multiply to the table's probability.
    digits = teacher[..., :SEP].log_softmax(dim=-1).double()
    along = digits.gather(2, responses.unsqueeze(2)).squeeze(2).sum(dim=1)
    index = (responses * torch.tensor([1000, 100, 10, 1])).sum(dim=1)
    assert torch.allclose(along, table[torch.arange(3), index], atol=1e-5)


def test_the_divergences_match_hand_computations():
    # p = (1/2, 1/2), q = (1/4, 3/4), each divergence written out term by term.
    p, q = torch.tensor([[[0.5, 0.5]]]).log(), torch.tensor([[[0.25, 0.75]]]).log()
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    forward = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert math.isclose(divergence_loss(p, q, 'reverse-kl', 0.5).item(), reverse, rel_tol=1e-6)
    assert math.isclose(divergence_loss(p, q, 'forward-kl', 0.5).item(), forward, rel_tol=1e-6)
    # JSD at 1/2: m = (3/8, 5/8), (KL(q || m) + KL(p || m)) / 2.
    m = (0.375, 0.625)
    jsd = 0.5 * sum(a * math.log(a / b) for a, b in zip((0.25, 0.75), m)) + \
        0.5 * sum(a * math.log(a / b) for a, b in zip((0.5, 0.5), m))
    assert math.isclose(divergence_loss(p, q, 'jsd', 0.5).item(), jsd, rel_tol=1e-6)
    assert divergence_loss(p, p, 'jsd', 0.3).abs().item() < 1e-7


@pytest.mark.slow  # a minute on a quiet 2-core machine: `pytest -m slow`
def test_twelve_rounds_distil_pi_star_closing_most_of_the_gap(sft_policy, reward_model):
    tables = exact_tables(sft_policy, reward_model, sample_prompts(20, torch.Generator().manual_seed(3)),
                          PREFERENCES['first-digit'])
    schedule = {'iters': 12, 'prompts_per_iter': 16, 'samples_per_prompt': 8}  # 16 prompts of 8 responses a round
    config = DistillConfig(**{**dict(METHODS['distill'].quick), **schedule})
    log_pi = all_response_log_probs(train_quickly('distill', sft_policy, reward_model, **schedule)[0], tables.prompts)
    teacher = METHODS['distill'].target(tables, config)
    # Measured (seed 0, 12 rounds): 0.23 nats from the teacher (the SFT policy 5.9), 96% of the gap
    # to J* closed (93.7% after 4 rounds, 94.8% after 8: still climbing, slowly).
    assert response_kl(log_pi, teacher).mean() < 0.35
    J, J_ref = (objective(x, tables.log_ref, tables.rewards, 1.0).mean() for x in (log_pi, tables.log_ref))
    J_star = optimal_value(tables.log_ref, tables.rewards, 1.0).mean()
    assert (J - J_ref) / (J_star - J_ref) > 0.93
    assert expected_reward(log_pi, tables.rewards).mean() > expected_reward(tables.log_ref, tables.rewards).mean()


def test_a_prompt_pool_enumerates_each_of_its_prompts_once_and_every_round_draws_from_it(monkeypatch):
    import toy_rlhf.methods.distill as distill
    torch.manual_seed(0)  # untrained models: what is counted does not depend on what they learned
    sft_policy, reward_model = GPT(policy_config()), GPT(reward_model_config())
    scored, rolled_out = [], []
    def counting_rewards(model, prompts):
        scored.append(prompts)
        return all_response_rewards(model, prompts)
    def recording_rollout(actor, reference, reward, prompts, *args):
        rolled_out.append(prompts)
        return rollout(actor, reference, reward, prompts, *args)
    monkeypatch.setattr(distill, 'all_response_rewards', counting_rewards)
    monkeypatch.setattr(distill, 'rollout', recording_rollout)
    config = DistillConfig(iters=3, prompts_per_iter=2, samples_per_prompt=2, prompt_pool=4)
    distill.train_distill(sft_policy, reward_model, config, PREFERENCES['first-digit'], progress=False)
    # The reward model's enumeration is the cost: once per pool prompt (fresh prompts: 2 every round).
    assert [len(prompts) for prompts in scored] == [4]
    seen = {tuple(prompt) for prompts in scored for prompt in prompts.tolist()}
    for prompts in rolled_out:  # each round's prompts (each repeated for its samples) had their teacher scored
        assert {tuple(prompt) for prompt in prompts.tolist()} <= seen and len(prompts) == 4


def test_a_pool_smaller_than_a_rounds_prompts_is_refused_before_anything_is_computed():
    with pytest.raises(TrainingError, match='prompt_pool 4 is smaller than prompts_per_iter 16'):
        prompt_pool(reference=None, rewards_of=None, config=DistillConfig(prompt_pool=4, prompts_per_iter=16),
                    generator=None)


def test_a_greedy_sampler_writes_the_states_the_student_is_taught_at(monkeypatch):
    # Top-k 1: the sampler, not the student, writes each round's responses, every sample of a prompt
    # the same one (the student would write several); the teacher is read at those states. Untrained
    # models, two prompts of four samples, one round: only the plumbing is checked.
    import toy_rlhf.methods.distill as distill
    torch.manual_seed(0)
    sft_policy, reward_model = GPT(policy_config()), GPT(reward_model_config())
    taught = []
    def recording_update(student, optimizer, batch, config):
        taught.append(batch['sentences'].view(2, 4, -1))
        return update(student, optimizer, batch, config)
    update = distill.update
    monkeypatch.setattr(distill, 'update', recording_update)
    for top_k in (1, 0):
        config = DistillConfig(iters=1, prompts_per_iter=2, samples_per_prompt=4, sampler_top_k=top_k)
        distill.train_distill(sft_policy, reward_model, config, PREFERENCES['first-digit'], progress=False)
    greedy, sampled = taught
    assert all(len(set(map(tuple, prompt.tolist()))) == 1 for prompt in greedy)
    assert any(len(set(map(tuple, prompt.tolist()))) > 1 for prompt in sampled)
