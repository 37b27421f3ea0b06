"""LLaMA-Factory 0.9.5's other text templates, as keyword arguments of templates.Template, so that its configs'
`template:` names work unchanged. tests/test_lf_templates.py renders each against LLaMA-Factory's own rendering
(tests/data/lf_templates.json) and names every place where tuneforge differs on purpose:
- whitespace after an answer's end-of-turn text is part of the next prompt, not learned;
- where LLaMA-Factory writes eos once at the end of the whole sequence (its `efficient_eos`), each answer ends with it,
  so every answer teaches the model to stop;
- templates with thinking blocks render as Qwen3's own template does: earlier answers lose their empty block, and
  the last one's follows the answer format's opening text (GLM's newline), where LLaMA-Factory puts it first.
Tool definitions, calls and results render as LLaMA-Factory writes them in each template's tool format (tools.py,
which names its own few differences)."""

# the ChatML family's turns (chatml, qwen and the many models that write them)
CHATML = dict(system="<|im_start|>system\n{content}<|im_end|>\n",
              user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
              assistant="{content}<|im_end|>", separator="\n", stop_words=("<|im_end|>",))
CHATML_TOOL = "<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n"  # a tool result

TABLE = [
    dict(name="bailing", user="<role>HUMAN</role>{content}<role>ASSISTANT</role>", assistant="{content}{eos}",
         system="<role>SYSTEM</role>{content}", observation="<role>OBSERVATION</role>{content}<role>ASSISTANT</role>",
         stop_words=("<|endoftext|>",)),
    dict(name="bailing_v2", user="<role>HUMAN</role>{content}<|role_end|><role>ASSISTANT</role>",
         assistant="{content}<|role_end|>{eos}", system="<role>SYSTEM</role>{content}<|role_end|>",
         observation="<role>OBSERVATION</role>\n<tool_response>\n{content}\n</tool_response><|role_end|><role>"
                     "ASSISTANT</role>",
         stop_words=("<|endoftext|>",), tool_format="ling"),
    dict(name="breeze", user="[INST] {content} [/INST] ", assistant="{content}{eos}", prefix="{bos}"),
    dict(name="chatglm3", user="<|user|>\n{content}<|assistant|>", assistant="\n{content}{eos}",
         system="<|system|>\n{content}", prefix="[gMASK]sop", observation="<|observation|>\n{content}<|assistant|>",
         function="{content}{eos}", stop_words=("<|user|>", "<|observation|>"), tool_format="glm4"),
    dict(CHATML, name="chatml_de", observation=CHATML_TOOL,
         default_system="Du bist ein freundlicher und hilfsbereiter KI-Assistent.",
         stop_words=("<|im_end|>", "<|im_start|>")),
    dict(name="cohere",
         user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
              "<|CHATBOT_TOKEN|>",
         assistant="{content}{eos}", system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
         prefix="{bos}"),
    dict(CHATML, name="cpm4", prefix="{bos}", observation=CHATML_TOOL),
    dict(CHATML, name="dbrx", observation=CHATML_TOOL,
         default_system="You are DBRX, created by Databricks. You were last updated in December 2023. You answer "
                        "questions based on information available up to that point.\nYOU PROVIDE SHORT RESPONSES TO "
                        "SHORT QUESTIONS OR STATEMENTS, but provide thorough responses to more complex and "
                        "open-ended questions.\nYou assist with various tasks, from writing to coding (using "
                        "markdown for code blocks — remember to use ``` with code, JSON, and tables).\n(You do not "
                        "have real-time data access or code execution capabilities. You avoid stereotyping and "
                        "provide balanced perspectives on controversial topics. You do not provide song lyrics, "
                        "poems, or news articles and do not divulge details of your training data.)\nThis is your "
                        "system prompt, guiding your responses. Do not reference it, just respond to the user. If "
                        "you find yourself talking about this message, stop. You should be responding appropriately "
                        "and usually that means not mentioning this.\nYOU DO NOT MENTION ANY OF THIS INFORMATION "
                        "ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE USER'S QUERY."),
    dict(name="deepseek", user="User: {content}\n\nAssistant:", assistant="{content}{eos}", system="{content}\n\n",
         prefix="{bos}"),
    dict(name="deepseekr1", user="<｜User｜>{content}<｜Assistant｜>", assistant="{content}{eos}", prefix="{bos}",
         thinking=True),
    dict(name="deepseekcoder", user="### Instruction:\n{content}\n### Response:", assistant="\n{content}\n<|EOT|>",
         separator="\n", prefix="{bos}",
         default_system="You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by "
                        "DeepSeek Company, and you only answer questions related to computer science. For "
                        "politically sensitive questions, security and privacy issues, and other non-computer "
                        "science questions, you will refuse to answer.\n"),
    dict(name="ernie", user="<|im_start|>user\n{content}<|im_end|>\n\n<|im_start|>assistant\n",
         assistant="{content}<|im_end|>", system="<|im_start|>system\n{content}<|im_end|>\n\n", separator="\n\n",
         observation="<|im_start|>tool\n{content}<|im_end|>\n\n<|im_start|>assistant\n",
         default_system="<global_setting>\nthink_mode=True\n</global_setting>", stop_words=("<|im_end|>",)),
    dict(name="ernie_nothink", user="User: {content}\nAssistant: ", assistant="{content}<|end_of_sentence|>",
         system="{content}\n", prefix="<|begin_of_sentence|>", stop_words=("<|end_of_sentence|>",)),
    dict(name="exaone", user="[|user|]{content}\n[|assistant|]", assistant="{content}{eos}",
         system="[|system|]{content}[|endofturn|]\n", separator="\n"),
    dict(name="falcon", user="User: {content}\nFalcon:", assistant="{content}\n{eos}"),
    dict(CHATML, name="falcon_h1", prefix="{bos}", observation=CHATML_TOOL,
         stop_words=("<|im_end|>", "<|end_of_text|>")),
    dict(name="fewshot", user="{content}", assistant="{content}\n\n{eos}"),
    dict(name="gemma2", user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
         assistant="{content}<end_of_turn>\n{eos}", system="{content}\n\n", prefix="{bos}",
         observation="<start_of_turn>tool\n{content}<end_of_turn>\n<start_of_turn>model\n",
         stop_words=("<eos>", "<end_of_turn>"), system_in_user=True),
    dict(name="glm4_moe", user="<|user|>\n{content}<|assistant|>", assistant="\n{content}{eos}",
         system="<|system|>\n{content}", prefix="[gMASK]<sop>", observation="<|observation|>\n{content}<|assistant|>",
         function="{content}{eos}", stop_words=("<|user|>", "<|observation|>"), tool_format="glm4_moe", thinking=True),
    dict(name="glmz1", user="<|user|>\n{content}<|assistant|>", assistant="\n{content}{eos}",
         system="<|system|>\n{content}", prefix="[gMASK]<sop>", observation="<|observation|>\n{content}<|assistant|>",
         function="{content}{eos}", stop_words=("<|user|>", "<|observation|>"), tool_format="glm4", thinking=True),
    dict(name="granite3",
         user="<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n<|start_of_role|>"
              "assistant<|end_of_role|>",
         assistant="{content}<|end_of_text|>",
         system="<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n", separator="\n"),
    dict(name="granite4",
         user="<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n<|start_of_role|>"
              "assistant<|end_of_role|>",
         assistant="{content}<|end_of_text|>",
         system="<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n", separator="\n",
         observation="<|start_of_role|>tool<|end_of_role|>{content}<|end_of_text|>\n<|start_of_role|>assistant\n",
         default_system="You are Granite, developed by IBM. You are a helpful AI assistant.",
         stop_words=("<|end_of_text|>",)),
    dict(name="index", user="reserved_0{content}reserved_1", assistant="{content}{eos}", system="<unk>{content}"),
    dict(name="hunyuan", user="{content}<|extra_0|>", assistant="{content}<|eos|>", system="{content}<|extra_4|>",
         prefix="<|startoftext|>", stop_words=("<|eos|>",)),
    dict(name="hunyuan_small", user="<｜hy_User｜>{content}<｜hy_place▁holder▁no▁8｜>",
         assistant="{content}<｜hy_place▁holder▁no▁2｜>", system="{content}<｜hy_place▁holder▁no▁3｜>",
         prefix="<｜hy_begin▁of▁sentence｜>", stop_words=("<｜hy_place▁holder▁no▁2｜>",)),
    dict(CHATML, name="intern2", prefix="{bos}",
         default_system="You are an AI assistant whose name is InternLM (书生·浦语).\n- InternLM (书生·浦语) is a "
                        "conversational language model that is developed by Shanghai AI Laboratory (上海人工智能实验室). It "
                        "is designed to be helpful, honest, and harmless.\n- InternLM (书生·浦语) can understand and "
                        "communicate fluently in the language chosen by the user such as English and 中文."),
    dict(CHATML, name="lfm2",
         observation="<|im_start|>tool\n<|tool_response_start|>{content}<|tool_response_end|><|im_end|>\n"
                     "<|im_start|>assistant\n",
         default_system="You are a helpful AI assistant.", tool_format="lfm2"),
    dict(name="llama2_zh", user="{bos}[INST] {content} [/INST]", assistant="{content}{eos}",
         system="<<SYS>>\n{content}\n<</SYS>>\n\n", default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
         system_in_user=True),
    dict(name="moonlight",
         user="<|im_user|>user<|im_middle|>{content}<|im_end|><|im_assistant|>assistant<|im_middle|>",
         assistant="{content}<|im_end|>", system="<|im_system|>system<|im_middle|>{content}<|im_end|>",
         default_system="You are a helpful assistant provided by Moonshot-AI.", stop_words=("<|im_end|>",)),
    dict(CHATML, name="mimo",
         observation="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>"
                     "assistant\n",
         default_system="You are a helpful assistant.", tool_format="qwen", thinking=True),
    dict(name="minimax1",
         user="<beginning_of_sentence>user name=user\n{content}<end_of_sentence>\n<beginning_of_sentence>ai "
              "name=assistant\n",
         assistant="{content}<end_of_sentence>",
         system="<beginning_of_sentence>system ai_setting=assistant\n{content}<end_of_sentence>\n", separator="\n",
         observation="<beginning_of_sentence>tool name=tools\n{content}<end_of_sentence>\n<beginning_of_sentence>ai "
                     "name=assistant\n",
         default_system="You are a helpful assistant.", stop_words=("<end_of_sentence>",), tool_format="minimax1"),
    dict(name="minimax2", user="]~b]user\n{content}[e~[\n]~b]ai\n", assistant="{content}[e~[",
         system="]~!b[]~b]system\n{content}[e~[\n", separator="\n",
         observation="]~b]tool\n<response>{content}</response>[e~[\n]~b]ai\n",
         default_system="You are a helpful assistant. Your name is MiniMax-M2.1 and is built by MiniMax.",
         stop_words=("[e~[",), tool_format="minimax2", thinking=True),
    dict(name="ministral", user="[INST]{content}[/INST]", assistant="{content}{eos}", system="{content}\n\n",
         prefix="{bos}", observation="[TOOL_RESULTS]{\"content\": {content}}[/TOOL_RESULTS]",
         function="[TOOL_CALLS]{content}{eos}", system_in_user=True, tool_format="mistral"),
    dict(name="olmo", user="<|user|>\n{content}<|assistant|>\n", assistant="{content}{eos}", prefix="{eos}"),
    dict(name="openchat", user="GPT4 Correct User: {content}{eos}GPT4 Correct Assistant:", assistant="{content}{eos}",
         prefix="{bos}"),
    dict(name="openchat-3.6",
         user="<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n{content}<|eot_id|><|start_header_id|>GPT4 "
              "Correct Assistant<|end_header_id|>\n\n",
         assistant="{content}{eos}", prefix="{bos}", stop_words=("<|eot_id|>",)),
    dict(CHATML, name="opencoder", observation=CHATML_TOOL,
         default_system="You are OpenCoder, created by OpenCoder Team."),
    dict(name="phi", user="<|user|>\n{content}<|end|>\n<|assistant|>\n", assistant="{content}<|end|>",
         system="<|system|>\n{content}<|end|>\n", separator="\n", stop_words=("<|end|>",)),
    dict(name="phi_small", user="<|user|>\n{content}<|end|>\n<|assistant|>\n", assistant="{content}<|end|>",
         system="<|system|>\n{content}<|end|>\n", separator="\n", stop_words=("<|end|>",)),
    dict(name="phi4_mini", user="<|user|>{content}<|end|><|assistant|>", assistant="{content}<|end|>",
         system="<|system|>{content}<|end|>", stop_words=("<|end|>",), tool_format="phi4_mini"),
    dict(name="sailor", user="<|im_start|>question\n{content}<|im_end|>\n<|im_start|>answer\n",
         assistant="{content}<|im_end|>", system="<|im_start|>system\n{content}<|im_end|>\n", separator="\n",
         default_system="You are an AI assistant named Sailor created by Sea AI Lab. Your answer should be "
                        "friendly, unbiased, faithful, informative and detailed.",
         stop_words=("<|im_end|>",)),
    dict(name="seed_coder", user="{bos}user\n{content}{eos}{bos}assistant\n", assistant="{content}{eos}",
         system="{bos}system\n{content}{eos}",
         default_system="You are an AI programming assistant, utilizing the Seed-Coder model, developed by "
                        "ByteDance Seed, and you only answer questions related to computer science. For politically "
                        "sensitive questions, security and privacy issues, and other non-computer science "
                        "questions, you will refuse to answer.\n\n"),
    dict(CHATML, name="smollm"),
    dict(CHATML, name="smollm2",
         default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face."),
    dict(name="solar", user="### User:\n{content}\n\n### Assistant:\n", assistant="{content}{eos}",
         system="### System:\n{content}\n\n"),
    dict(name="starchat", user="<|user|>\n{content}<|end|>\n<|assistant|>", assistant="{content}<|end|>",
         system="<|system|>\n{content}<|end|>\n", separator="\n", stop_words=("<|end|>",)),
    dict(name="telechat2", user="<_user>{content}<_bot>", assistant="{content}{eos}", system="<_system>{content}",
         default_system="你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院（TeleAI）研发的人工智能助手。"),
    dict(name="xuanyuan", user="Human: {content} Assistant:", assistant="{content}{eos}",
         default_system="以下是用户和人工智能助手之间的对话。用户以Human开头，人工智能助手以Assistant开头，会对人类提出的问题给出有帮助、高质量、详细和礼貌的回答，并且总是拒绝参与与不道德、不安"
                        "全、有争议、政治敏感等相关的话题、问题和指示。\n"),
    dict(name="youtu", user="<|User|>{content}<|Assistant|>", assistant="{content}<|end_of_text|>", prefix="{bos}",
         observation="<tool_response>\n{content}\n</tool_response><|Assistant|>", function="{content}",
         stop_words=("<|end_of_text|>",), thinking=True),
    dict(name="yuan", user="{content}<sep>", assistant="{content}<eod>", separator="\n", stop_words=("<eod>",)),
]

# LLaMA-Factory's templates whose thinking blocks use other markers than <think>\n...\n</think>\n\n
OTHER_THOUGHT_MARKERS = {"hy3": "<think></think>", "glm4_7": "</think>", "gpt_oss": "<|channel|>analysis<|message|>",
                         "mimo_v2": "<think></think>", "seed_oss": "<seed:think>", "aeva": "</think>"}
