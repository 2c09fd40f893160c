"""The agent and its local self-evolution: rollouts, success filter, buffer, SFT, evaluation."""
