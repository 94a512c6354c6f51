"""Prompt templates: how a question, a probe and a self-verification question are worded per model.

Six ship: :data:`TESTBED` (the raw format the testbed model was trained on), :data:`CHAT`
(math questions for instruct models with a chat template, such as Qwen2.5-Coder-Instruct),
:data:`CODE` (code questions for the same models: the HumanEval prompt in a ```python block),
:data:`FACTUAL` (short factual questions: a short answer in ``\\boxed{}``), :data:`REASONING`
(models that think inside ``<think>`` ... ``</think>`` before answering) and
:data:`TESTBED_REASONING` (its raw form, for the testbed reasoning model:
:mod:`env.models.testbed.reasoning`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from env.models.testbed import task as _task
from env.types import PromptMode
from features.errors import ConfigError

__all__ = [
    "CONTEXT_ROLES",
    "PromptTemplate",
    "TESTBED",
    "CHAT",
    "CODE",
    "FACTUAL",
    "REASONING",
    "TESTBED_REASONING",
    "KNOWN_THINKING",
    "ThinkingFormat",
    "find_thinking_format",
    "TEMPLATES",
    "get_template",
]

#: Roles a conversation before the question may hold (:attr:`env.types.Question.context`).
CONTEXT_ROLES = ("system", "user", "assistant")

#: ``apply_chat(messages) -> str`` renders chat messages with the model's chat template and the
#: assistant generation prompt.
ApplyChat = Callable[[list[dict[str, str]]], str]


@dataclass(frozen=True, slots=True)
class ThinkingFormat:
    """How a reasoning model marks its thinking section (``<think>`` ... ``</think>``).

    Attributes:
        start: the marker that opens the section (chat templates of reasoning models often
            write it into the generation prompt themselves).
        end: the marker that closes it; the answer follows.
    """

    start: str
    end: str


#: Thinking markers of the reasoning models ponder knows, looked up in a chat template.
KNOWN_THINKING = (
    ThinkingFormat("<think>", "</think>"),
    ThinkingFormat("<thinking>", "</thinking>"),
    ThinkingFormat("<|begin_of_thought|>", "<|end_of_thought|>"),
)


def find_thinking_format(chat_template: str | None) -> ThinkingFormat | None:
    """The thinking markers a model's chat template uses (both must appear in it), or None
    for a model without a thinking section."""
    if not chat_template:
        return None
    return next(
        (f for f in KNOWN_THINKING if f.start in chat_template and f.end in chat_template), None
    )


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """How to word prompts for one model family.

    Attributes:
        name: template name (``testbed`` or ``chat``).
        chat: whether prompts go through the model's chat template.
        system: system message (chat only).
        cot: the question prompt in ``cot`` mode, with ``{question}``.
        draft: the question prompt in Chain-of-Draft mode, with ``{question}``.
        probe_suffix: appended to a chain to force an answer; the answer follows, closed by ``}``.
        wait_text: appended by budget forcing to suppress an ending.
        judge: the self-verification prompt, with ``{question}`` and ``{solution}`` (used when
            ``judge_followup`` is ``None``: a standalone prompt, re-read in full every time).
        judge_followup: chat only: the user turn that asks, right after the chain so far, whether
            it is correct. The verifier's context is then the chain's own context plus this turn,
            so everything up to the chain's last token comes from the prefix cache.
        judge_yes: first tokens that mean "yes".
        judge_no: first tokens that mean "no".
        thinking: the model's thinking markers (reasoning models), or None. With them, budget
            forcing counts the thinking section (:class:`~env.generators.live.LiveGenerator`)
            and a probe from inside it closes the section first (:meth:`probe_text`).
    """

    name: str
    chat: bool
    system: str | None
    cot: str
    draft: str
    probe_suffix: str
    wait_text: str
    judge: str
    judge_followup: str | None = None
    judge_yes: tuple[str, ...] = ("yes", " yes", "Yes", " Yes", "YES")
    judge_no: tuple[str, ...] = ("no", " no", "No", " No", "NO")
    thinking: ThinkingFormat | None = None

    def probe_text(self, thinking_open: bool) -> str:
        """What a probe appends: the probe suffix, after closing the thinking section when the
        chain is still inside it (the chain itself is left as it is). The closing marker goes on
        a line of its own, as models write it: a probe or a forced answer mostly cuts a line."""
        if thinking_open and self.thinking is not None:
            return "\n" + self.thinking.end + "\n\n" + self.probe_suffix.lstrip("\n")
        return self.probe_suffix

    def question_prompt(
        self,
        question: str,
        mode: PromptMode,
        apply_chat: ApplyChat | None,
        context: Sequence[tuple[str, str]] = (),
    ) -> str:
        """The full prompt text for a question in a mode, after the conversation ``context``
        (``(role, content)`` pairs: see :attr:`env.types.Question.context`).

        Raises:
            ConfigError: an unknown mode; a context on a template without a chat template; a
                context role other than system, user and assistant; a system message after
                the conversation has begun.
        """
        if mode == "cot":
            body = self.cot.format(question=question)
        elif mode == "draft":
            body = self.draft.format(question=question)
        else:
            raise ConfigError(f"prompt mode must be 'cot' or 'draft', got {mode!r}")
        return self._wrap(body, apply_chat, context)

    def judge_prompt(self, question: str, solution: str, apply_chat: ApplyChat | None) -> str:
        """The self-verification prompt for a (possibly partial) solution."""
        body = self.judge.format(question=question, solution=solution.rstrip())
        return self._wrap(body, apply_chat)

    def judge_suffix(self, apply_chat: ApplyChat | None) -> str | None:
        """Text appended to a chain's context to ask the follow-up verification question.

        ``None`` when the template judges with a standalone prompt. For chat templates the suffix
        is rendered by the model's own chat template: the assistant turn is closed, the follow-up
        user turn is written and the assistant generation prompt is opened.
        """
        if self.judge_followup is None:
            return None
        if not self.chat or apply_chat is None:
            raise ConfigError(
                f"template {self.name!r} has a follow-up judge, which needs a chat template"
            )
        mark = "\x00PONDER-SOLUTION\x00"
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": mark},
            {"role": "user", "content": self.judge_followup},
        ]
        rendered = apply_chat(messages)
        if rendered.count(mark) != 1:
            raise ConfigError(
                f"the model's chat template does not render an assistant turn verbatim; use a "
                f"template without judge_followup (template {self.name!r})"
            )
        return rendered.split(mark, 1)[1]

    def prompt_texts(self) -> dict[str, str]:
        """Every wording of this template, for the bank manifest."""
        out = {
            "system": self.system or "",
            "cot": self.cot,
            "draft": self.draft,
            "probe_suffix": self.probe_suffix,
            "wait_text": self.wait_text,
        }
        if self.judge_followup is None:
            out["judge"] = self.judge
        else:
            out["judge_followup"] = self.judge_followup
        if self.thinking is not None:  # (only reasoning templates: older banks' wording stays)
            out["thinking_start"] = self.thinking.start
            out["thinking_end"] = self.thinking.end
        return out

    def _wrap(
        self, body: str, apply_chat: ApplyChat | None, context: Sequence[tuple[str, str]] = ()
    ) -> str:
        if not self.chat:
            if context:
                raise ConfigError(
                    f"template {self.name!r} renders one question without a chat template: a "
                    "conversation (a system prompt or earlier turns) needs a chat model and the "
                    "'chat' template"
                )
            return body
        if apply_chat is None:
            raise ConfigError(
                f"template {self.name!r} needs the model's chat template, but the generator has "
                "none: use the 'testbed' template for raw models"
            )
        return apply_chat(self.messages(body, context))

    def messages(self, body: str, context: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
        """The chat messages of a prompt: the system message (the conversation's own, else the
        template's), the earlier turns, then ``body`` as the last user turn."""
        systems = 0
        for role, _ in context:
            if role not in CONTEXT_ROLES:
                raise ConfigError(
                    f"a conversation turn's role must be one of {', '.join(CONTEXT_ROLES)}, "
                    f"got {role!r}"
                )
            if role != "system":
                break
            systems += 1
        if any(role == "system" for role, _ in context[systems:]):
            raise ConfigError("system messages must come before the conversation's first turn")
        head = [{"role": r, "content": c} for r, c in context[:systems]]
        if not head and self.system:
            head = [{"role": "system", "content": self.system}]
        turns = [{"role": r, "content": c} for r, c in context[systems:]]
        return [*head, *turns, {"role": "user", "content": body}]


TESTBED = PromptTemplate(
    name="testbed",
    chat=False,
    system=None,
    cot="Question: {question}\nSolution:\n",
    draft="Question: {question}\nDraft:\n",
    probe_suffix=_task.PROBE_SUFFIX,
    wait_text=_task.WAIT_TEXT,
    judge="Question: {question}\nCheck:\n{solution}\nCorrect?",
)

CHAT = PromptTemplate(
    name="chat",
    chat=True,
    system="You are a helpful assistant that solves math problems.",
    cot=("{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."),
    # Chain-of-Draft (Xu et al., 2025): terse drafts instead of full sentences.
    draft=(
        "{question}\nThink step by step, but only keep a minimum draft for each thinking step, "
        "with 5 words at most. Put your final answer within \\boxed{{}}."
    ),
    probe_suffix="\n\n... I now know the final answer.\n\nFinal answer: \\boxed{",
    wait_text="\nWait,",
    judge=(
        "Here is a math question and a solution that may be incomplete.\n\n"
        "Question: {question}\n\nSolution so far:\n{solution}\n\n"
        "Is the solution correct so far? Answer with yes or no only."
    ),
    judge_followup="Is your solution correct so far? Answer with yes or no only.",
)

CODE = PromptTemplate(
    name="code",
    chat=True,
    system="You are a helpful assistant that writes correct Python code.",
    cot=(
        "Complete the following Python function. Think briefly about the approach, then give "
        "the complete function, with any imports it needs, in one ```python code block.\n\n"
        "```python\n{question}```"
    ),
    draft=(
        "Complete the following Python function. Give only the complete function, with any "
        "imports it needs, in one ```python code block.\n\n```python\n{question}```"
    ),
    # A code chain's answer is read from its code block (env.code), not forced: this suffix
    # is what a model probe would append, kept for generators that probe anyway.
    probe_suffix="\n\nThe final code is in the block above. Final answer: \\boxed{",
    wait_text="\nWait,",
    judge=(
        "Here is a Python task and a solution that may be incomplete.\n\n"
        "Task:\n{question}\n\nSolution so far:\n{solution}\n\n"
        "Is the solution correct so far? Answer with yes or no only."
    ),
    judge_followup="Is your code correct so far? Answer with yes or no only.",
)

FACTUAL = PromptTemplate(
    name="factual",
    chat=True,
    system="You are a helpful assistant that answers questions accurately.",
    cot=(
        "Answer the question below. Think briefly if you need to, then write the final "
        "answer (a name, a date, a number or a short phrase) within \\boxed{{}}, for example "
        "\\boxed{{Paris}}.\n\nQuestion: {question}"
    ),
    draft=(
        "{question}\nGive only the answer (a name, a date, a number or a short phrase) "
        "within \\boxed{{}}."
    ),
    probe_suffix="\n\nFinal answer: \\boxed{",
    wait_text="\nWait,",
    judge=(
        "Here is a question and an answer that may be incomplete.\n\n"
        "Question: {question}\n\nAnswer so far:\n{solution}\n\n"
        "Is the answer correct so far? Answer with yes or no only."
    ),
    judge_followup="Is your answer correct? Answer with yes or no only.",
)

REASONING = PromptTemplate(
    name="reasoning",
    chat=True,
    system=None,  # reasoning models are usually prompted without one
    cot=CHAT.cot,
    draft=CHAT.draft,
    probe_suffix="The final answer is \\boxed{",
    wait_text="\nWait,",
    # A standalone verification prompt that quotes the whole chain, thinking included: chat
    # templates of reasoning models drop earlier turns' thinking, so a follow-up turn would
    # judge the answer without the reasoning.
    judge=CHAT.judge,
    judge_followup=None,
    thinking=KNOWN_THINKING[0],
)

TESTBED_REASONING = PromptTemplate(
    name="testbed-reasoning",
    chat=False,
    system=None,
    cot=TESTBED.cot,
    draft=TESTBED.draft,
    probe_suffix="The answer is \\boxed{",
    # The suppressed end of thinking follows its own line's newline ("...= 55\n</think>"), so
    # the re-check starts on that line, as in the training text ("...= 55\nWait, check b: ...").
    wait_text="Wait,",
    judge=TESTBED.judge,
    thinking=KNOWN_THINKING[0],
)

TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t for t in (TESTBED, CHAT, CODE, FACTUAL, REASONING, TESTBED_REASONING)
}


def get_template(name: str) -> PromptTemplate:
    """Look up a template by name."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            f"unknown prompt template {name!r}; choose one of {sorted(TEMPLATES)}"
        ) from None
