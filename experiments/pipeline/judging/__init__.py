"""Track 3's pairwise judging harness, in its parts:

* `templates`: the judge prompt protocols (FastChat pair-v2, PandaLM, Auto-J, AlpacaEval's judges), the judge's
  replies and their parsers;
* `clients`: the judges (an OpenAI-compatible endpoint, a local transformers model, a fake) and what they do with
  what endpoints send back;
* `cache`: the on-disk cache of replies, keyed by what changes an answer;
* `pairwise`: matching outputs by instruction, judging the pairs in one or both orders, AlpacaEval's output files;
* `winrate`: win rate, standard error and the length-controlled win rate (AlpacaEval 2.0's GLM);
* `table`: the `instruct_winrate` table of `python -m experiments.tables`.
"""
