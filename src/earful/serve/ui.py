"""A Gradio voice chat on `/ui`: record or upload a clip, ask about it, read the answer as it streams.

It calls the same `SpeechLM.stream_chat` the HTTP API does. A turn with audio and no text asks for
a transcript (the task the model was trained on). A server with a voice (`--voice`) also plays the
answer, read out by that voice once it is complete.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..audio import AudioError
from .engine import RequestError, ServerBusy


def build_ui(lm) -> gr.Blocks:
    """The chat UI for a listening LM; the speech-in, speech-out UI for a units LM that speaks."""
    from .engine import SpeakingLM

    if isinstance(lm, SpeakingLM):
        return build_speaking_ui(lm)
    # Uploads land in Gradio's cache; files older than an hour are swept every 10 minutes.
    with gr.Blocks(title=f"earful · {lm.name}", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown(f"## earful · `{lm.name}`\nRecord or upload speech, then send it. With no text, the model transcribes.")
        chatbot = gr.Chatbot(label="Conversation", elem_id="earful-chat", height=360)
        spoken = None
        if lm.voice is not None:
            spoken = gr.Audio(label=f"The answer, read out by {lm.voice.name} (a cascade)", elem_id="earful-spoken",
                              interactive=False, autoplay=True)
        with gr.Row():
            audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="earful-audio")
            message = gr.Textbox(label="Message", placeholder="Ask about the audio (empty: transcribe it)", elem_id="earful-message", lines=2)
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="earful-send")
            clear = gr.Button("Clear", elem_id="earful-clear")
        conversation = gr.State([])  # the engine's messages, audio included

        def respond(audio_path, text, history, convo):
            for out in answer_turn(audio_path, text, history, convo):
                yield out if spoken is None else (*out, gr.skip())
            if spoken is not None:
                reply = out[1][-1]["content"]
                wave = lm.voice.speak(reply)
                yield (*out, (lm.voice.sampling_rate, wave) if len(wave) else None)

        def answer_turn(audio_path, text, history, convo):
            text = (text or "").strip()
            parts = [text] if text else []
            try:
                if audio_path:
                    parts.append(lm.read_audio(audio_path, name="the uploaded audio"))
                if not parts:
                    raise gr.Error("Record or upload audio, or type a message.")
                convo = [*convo, {"role": "user", "content": parts}]
                clip = f"[audio: {Path(audio_path).name}]" if audio_path else ""
                shown = " ".join(x for x in (clip, text) if x)
                history = [*(history or []), {"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
                answer = ""
                for piece in lm.stream_chat(messages=convo):
                    answer += piece
                    history[-1] = {"role": "assistant", "content": answer}
                    yield history, convo, None, ""
            except (AudioError, RequestError, ServerBusy) as e:
                raise gr.Error(str(e)) from None
            yield history, [*convo, {"role": "assistant", "content": answer}], None, ""

        outputs = [chatbot, conversation, audio, message] + ([spoken] if spoken is not None else [])
        send.click(respond, [audio, message, chatbot, conversation], outputs)
        message.submit(respond, [audio, message, chatbot, conversation], outputs)
        clear.click(lambda: ([], [], None, "") + ((None,) if spoken is not None else ()), None, outputs)
    return demo


def build_speaking_ui(lm) -> gr.Blocks:
    """A units LM with a codec: speak or upload a prompt, hear its continuation."""
    with gr.Blocks(title=f"earful · {lm.name}", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown(f"## earful · `{lm.name}`\nRecord or upload speech; the model continues it, in speech.")
        with gr.Row():
            prompt = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Your speech", elem_id="earful-audio")
            answer = gr.Audio(label="The model's continuation", elem_id="earful-answer", interactive=False)
        info = gr.Markdown(elem_id="earful-info")
        send = gr.Button("Continue", variant="primary", elem_id="earful-send")

        def respond(path):
            if not path:
                raise gr.Error("Record or upload audio first.")
            try:
                prompt_units, units, wave = lm.continue_speech(path)
            except (AudioError, RequestError, ServerBusy, ValueError) as e:
                raise gr.Error(str(e)) from None
            if wave is None:
                raise gr.Error("This model's tokenizer cannot turn tokens back into audio.")
            return (lm.sampling_rate, wave), f"{len(prompt_units)} prompt tokens -> {len(units)} new tokens"

        send.click(respond, [prompt], [answer, info])
    return demo
