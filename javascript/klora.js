// K-LoRA panel: mouse-over help for every control.
// The panel's elements have stable ids "script_<tab>_klora_<key>" (Script.elem_id of the "K-LoRA" script);
// titles are attached by id, so no other part of the page is touched.
(function() {
    "use strict";

    const TABS = ["txt2img", "img2img"];

    const TIPS = {
        enable: "Fuse a content (subject) LoRA and a style LoRA with K-LoRA: in every layer, at every sampling " +
            "step, exactly one of the two is applied. A <klora:CONTENT:STYLE> tag in the prompt overrides this " +
            "panel and does not need the box ticked.",
        content: "The LoRA that carries the subject (a person, an object, a character). Do not also add it as a " +
            "<lora:...> tag: K-LoRA applies it.",
        style: "The LoRA that carries the style (a painter, a medium, a look). Do not also add it as a " +
            "<lora:...> tag: K-LoRA applies it.",
        content_strength: "Multiplier of the content LoRA, like the number in <lora:name:1>. K-LoRA compares the " +
            "LoRAs as they would be applied, so this also decides how many layers the content wins.",
        style_strength: "Multiplier of the style LoRA, like the number in <lora:name:1>. K-LoRA compares the " +
            "LoRAs as they would be applied, so this also decides how many layers the style wins.",
        pattern: "How the style's weight grows over the run: S(t) = alpha * t + beta, t going from 0 (first " +
            "step) to 1. Picking a pattern sets alpha and beta to its values.",
        alpha: "alpha: how fast the style's weight grows from the first step to the last. Higher: the style " +
            "takes over layers sooner.",
        beta: "beta: the style's weight at the first step. Content dominates: raise it (or try s*). The " +
            "subject gets lost: lower it.",
        gamma: "gamma balances LoRAs of different magnitude (the style's scores are multiplied by " +
            "gamma * S(t) before the comparison).",
        gamma_value: "Manual gamma (> 0). Larger: the style wins more layers.",
        mode: "K-LoRA: the paper's rule. The other modes are the paper's comparisons, to see what K-LoRA buys: " +
            "Top-K only (no gamma, no schedule), Fixed schedule (content while S(t) <= 1, then style), " +
            "Random (each layer and step: content with p = 1/3, seeded by the image seed), " +
            "Direct merge (both LoRAs always, as two <lora> tags).",
        scope: "Which layers K-LoRA chooses in; other layers that both LoRAs patch get both.",
        te: "The text encoder runs once per prompt, not per step, so K-LoRA does not choose there: apply both " +
            "LoRAs' text-encoder layers (as two <lora> tags would), one of them, or none.",
        show_map: "After the images, add the selection map (layers x steps: which LoRA each layer used at each " +
            "step) to the results. The map is not saved as a generated image.",
        analyze_steps: "Steps to draw the map for (Analyze only; generation uses the Sampling steps).",
        analyze: "Draw the selection map and a summary for the chosen pair now, without generating.",
    };

    const CHOICE_TIPS = {
        pattern: {
            "s (paper)": "The paper's schedule: alpha 1.5, beta 0.5. Content leads early, style late.",
            "s* (official)": "The official code's schedule: alpha 1.5, beta 1.275, S(t) taken modulo alpha. " +
                "Style wins earlier; the default there and for Flux.",
        },
        gamma: {
            "auto": "Per shared layer, the ratio of the LoRAs' total magnitudes; mean without outliers " +
                "(as the official code). Recomputed for each pair.",
            "paper (eq. 9)": "The paper's eq. 9: the content's total magnitude over all shared layers divided " +
                "by the style's.",
            "manual": "Your value, below.",
        },
        scope: {
            "All layers": "Choose in every UNet / transformer layer both LoRAs patch (as the official Flux code).",
            "Attention only": "Choose only in the attention projections q, k, v, out (as the official SDXL " +
                "code); the rest get both LoRAs.",
        },
        te: {
            "Both": "Apply both LoRAs' text-encoder layers, as two <lora> tags would.",
            "Content": "Apply only the content LoRA's text-encoder layers.",
            "Style": "Apply only the style LoRA's text-encoder layers.",
            "Neither": "Apply neither LoRA's text-encoder layers.",
        },
    };

    function translate(text) {
        return (typeof localization !== "undefined" && localization[text]) || text;
    }

    function setTitle(element, text) {
        if (element && !element.title) {
            element.title = translate(text);
        }
    }

    // The webui's hints give a dropdown's text box the title of its value ("None": "Do not do anything
    // special"), which would hide the panel's tip while the box is hovered: the box gets the tip itself.
    const DROPDOWNS = ["content", "style", "mode"];

    function setInputTitle(element, text) {
        const input = element && element.querySelector("input");
        if (input && input.title !== translate(text)) {
            input.title = translate(text);
        }
    }

    function applyTips() {
        const app = gradioApp();
        for (const tab of TABS) {
            for (const [key, text] of Object.entries(TIPS)) {
                const element = app.getElementById(`script_${tab}_klora_${key}`);
                if (!element) continue;
                // The accordion's title would be inherited by everything inside it: put it on the header only.
                setTitle(key === "enable" ? element.querySelector(".label-wrap") : element, text);
                if (DROPDOWNS.includes(key)) setInputTitle(element, text);
            }
            for (const [key, choices] of Object.entries(CHOICE_TIPS)) {
                const element = app.getElementById(`script_${tab}_klora_${key}`);
                if (!element) continue;
                for (const label of element.querySelectorAll("label")) {
                    const text = choices[label.textContent.trim()];
                    if (text) setTitle(label, text);
                }
            }
        }
    }

    let timer = null;
    function scheduleTips() {
        clearTimeout(timer);
        timer = setTimeout(applyTips, 500);
    }

    if (typeof onUiLoaded === "function") onUiLoaded(applyTips);
    // Gradio may re-render radios (e.g. after pasting parameters); titles already set are kept.
    if (typeof onUiUpdate === "function") onUiUpdate(scheduleTips);
})();
