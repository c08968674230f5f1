// sd-webui-ziplora: browser helpers for the ZipLoRA tab (the WebUI loads every javascript/*.js of an extension).
// Globals are prefixed ziplora_; each returns [] because the buttons that call them have no outputs.

/** Copy text (the `<lora:NAME:1> trigger words` tag) to the clipboard; works on plain-http LAN pages too. */
function ziplora_copy_tag(text) {
    text = String(text || "");
    var fallback = function() {
        var area = document.createElement("textarea");
        area.value = text;
        area.setAttribute("readonly", "");
        area.style.position = "fixed";
        area.style.opacity = "0";
        document.body.appendChild(area);
        area.select();
        try {
            document.execCommand("copy");
        } catch (e) {
            // nothing more to try; the tag stays selectable in its box
        }
        document.body.removeChild(area);
    };
    if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).catch(fallback);
    } else {
        fallback();
    }
    return [];
}

/** Append the tag to the txt2img prompt (once), tell gradio it changed, and switch to the txt2img tab. */
function ziplora_send_to_txt2img(text) {
    text = String(text || "").trim();
    var root = typeof gradioApp === "function" ? gradioApp() : document;
    var prompt = root.querySelector("#txt2img_prompt textarea");
    if (!text || !prompt) {
        return [];
    }
    var current = prompt.value.replace(/\s+$/, "");
    if (current.indexOf(text) === -1) {
        prompt.value = current ? current + (/[,\s]$/.test(current) ? " " : ", ") + text : text;
    }
    if (typeof updateInput === "function") {
        updateInput(prompt); // A1111/Forge helper: dispatches the input event gradio listens to
    } else {
        prompt.dispatchEvent(new Event("input", {bubbles: true}));
    }
    if (typeof switch_to_txt2img === "function") {
        switch_to_txt2img();
    }
    return [];
}
