"""The paper's RL setup in miniature: GRPO where the policy's own frozen copy gives the endogenous reward.

    pip install 'endokern[trl]'
    python examples/grpo_endogenous.py                         # stories260K (tests/fixtures), a few steps on CPU
    python examples/grpo_endogenous.py --model Qwen/Qwen2.5-Math-7B --steps 100 --reward-url http://127.0.0.1:8000

The reward model is the policy's starting checkpoint, frozen (arXiv 2506.23235, section 5: Qwen2.5-Math-7B is both);
it scores each completion in process, or through an ``endokern serve`` server with ``--reward-url``. Prints the mean
reward of each step's completions.
"""

import argparse
import os
import tempfile

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "stories260K")
PROMPTS = ["Once upon a time, there was a little", "One day, a girl named Lily went to the", "The cat saw a big",
           "Tom and his mom went to the park. They", "The sun was hot, so the boy", "A little dog found a ball in the",
           "Sam was sad because his toy", "In the garden, the flowers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=FIXTURE)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (GRPO's group)")
    parser.add_argument("--max-completion-length", type=int, default=24)
    parser.add_argument("--reduce", default="mean", choices=("sum", "mean"),
                        help="sum is the paper's; mean keeps GRPO from favouring length")
    parser.add_argument("--reward-url", help="an endokern serve server instead of an in-process reward model")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from endokern.integrations.trl import EndogenousReward

    torch.manual_seed(0)
    if args.reward_url:
        reward = EndogenousReward(url=args.reward_url, reduce=args.reduce)
    else:
        reward = EndogenousReward.from_pretrained(args.model, reduce=args.reduce, template="plain")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    class PrintReward(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **kwargs):
            if logs and "reward" in logs:
                print(f"step {state.global_step}: mean reward {logs['reward']:.4f} "
                      f"(std {logs.get('reward_std', float('nan')):.4f})", flush=True)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo-endogenous-"), max_steps=args.steps, learning_rate=1e-4,
        per_device_train_batch_size=args.generations * 2, num_generations=args.generations,
        max_completion_length=args.max_completion_length, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=False, seed=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}), callbacks=[PrintReward()])
    trainer.train()


if __name__ == "__main__":
    main()
