/*
 * Omnirouter chat widget. Embed with one tag:
 *   <script src="https://router.example/widget.js" data-channel="web" async></script>
 * Plain ES2017, no framework, no build step. Everything lives in a Shadow DOM, and every
 * text a customer or agent wrote is set with textContent (never parsed as HTML).
 * The conversation token is kept in localStorage, so a reload or a lost connection
 * resumes the same conversation and fetches what was missed (since=<last seq>).
 */
(function () {
  "use strict";

  var script = document.currentScript;
  if (!script || window.__omnirouterWidget) {
    return;
  }
  window.__omnirouterWidget = true;

  var base = new URL(script.src, window.location.href);
  var channel = script.getAttribute("data-channel") || "web";
  var storeKey = "omnirouter:" + channel + ":" + base.host;
  var MAX_BACKOFF_MS = 15000;

  var TEXT = {
    en: {
      open: "Chat with us",
      title: "Chat with us",
      close: "Close",
      placeholder: "Write a message…",
      send: "Send",
      sending: "sending…",
      failed: "not sent",
      you: "You",
      agent: "Agent",
      connecting: "Connecting…",
      offline: "Offline — reconnecting…",
      ack: function (minutes, ticket) {
        return (
          "We got your message (ticket " + ticket + "). An agent will answer within " +
          minutes + " minute" + (minutes === 1 ? "" : "s") + "."
        );
      },
      received: function (ticket) {
        return "We got your message (ticket " + ticket + ").";
      },
      tooLong: function (max) {
        return "The message is too long (at most " + max + " characters).";
      },
      slowDown: "Too many messages: it will be sent again in a moment.",
      empty: "Hello! Write your question and an agent will answer here.",
    },
    zh: {
      open: "在线咨询",
      title: "在线咨询",
      close: "关闭",
      placeholder: "请输入消息…",
      send: "发送",
      sending: "发送中…",
      failed: "未发送",
      you: "我",
      agent: "客服",
      connecting: "正在连接…",
      offline: "连接已断开，正在重连…",
      ack: function (minutes, ticket) {
        return "已收到您的消息（工单号 " + ticket + "），客服将在 " + minutes + " 分钟内回复。";
      },
      received: function (ticket) {
        return "已收到您的消息（工单号 " + ticket + "）。";
      },
      tooLong: function (max) {
        return "消息太长（最多 " + max + " 个字符）。";
      },
      slowDown: "发送太频繁，稍后将自动重发。",
      empty: "您好！请留言，客服会在这里回复您。",
    },
  };

  function pickLanguage() {
    var wanted = (
      script.getAttribute("data-lang") ||
      document.documentElement.lang ||
      navigator.language ||
      "en"
    ).toLowerCase();
    return wanted.indexOf("zh") === 0 ? "zh" : "en";
  }

  var lang = pickLanguage();
  var t = TEXT[lang];

  // -- state kept in the browser -------------------------------------------------------

  function randomId() {
    if (window.crypto && window.crypto.randomUUID) {
      return window.crypto.randomUUID();
    }
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.prototype.map
      .call(bytes, function (b) {
        return (b + 256).toString(16).slice(1);
      })
      .join("");
  }

  function load() {
    try {
      var saved = JSON.parse(window.localStorage.getItem(storeKey) || "null");
      if (saved && typeof saved.handle === "string") {
        return saved;
      }
    } catch (e) {
      /* storage blocked or corrupt: start afresh */
    }
    return { handle: "web-" + randomId(), token: null, outgoing: [], open: false };
  }

  var state = load();
  state.outgoing = state.outgoing || [];
  var entries = new Map(); // seq -> message frame (this page's view of the log)
  var lastSeq = 0;

  function save() {
    try {
      window.localStorage.setItem(storeKey, JSON.stringify(state));
    } catch (e) {
      /* private mode: the conversation lasts as long as the page */
    }
  }

  // -- the DOM (inside a shadow root, built with createElement and textContent) --------

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  var host = el("div");
  host.setAttribute("data-omnirouter-widget", channel);
  var root = host.attachShadow({ mode: "open" });
  var style = el("link");
  style.rel = "stylesheet";
  style.href = new URL("widget.css", base).href;
  root.appendChild(style);

  var launcher = el("button", "launcher", t.open);
  launcher.type = "button";
  launcher.setAttribute("aria-expanded", "false");
  var panel = el("section", "panel");
  panel.setAttribute("role", "dialog");
  panel.setAttribute("aria-label", t.title);
  panel.setAttribute("lang", lang);
  panel.hidden = true;
  var header = el("header", "header");
  header.appendChild(el("span", "title", t.title));
  var closeButton = el("button", "close", "×");
  closeButton.type = "button";
  closeButton.setAttribute("aria-label", t.close);
  header.appendChild(closeButton);
  var log = el("div", "log");
  log.setAttribute("role", "log");
  log.setAttribute("aria-live", "polite");
  var status = el("div", "status", t.connecting);
  status.setAttribute("role", "status");
  var form = el("form", "composer");
  var input = el("textarea", "input");
  input.rows = 2;
  input.placeholder = t.placeholder;
  input.setAttribute("aria-label", t.placeholder);
  var sendButton = el("button", "send", t.send);
  sendButton.type = "submit";
  form.appendChild(input);
  form.appendChild(sendButton);
  panel.appendChild(header);
  panel.appendChild(log);
  panel.appendChild(status);
  panel.appendChild(form);
  root.appendChild(panel);
  root.appendChild(launcher);

  function setOpen(open) {
    state.open = open;
    panel.hidden = !open;
    launcher.hidden = open;
    launcher.setAttribute("aria-expanded", String(open));
    save();
    if (open) {
      render();
      input.focus();
    }
  }

  launcher.addEventListener("click", function () {
    setOpen(true);
  });
  closeButton.addEventListener("click", function () {
    setOpen(false);
  });

  function bubble(kind, text, meta) {
    var row = el("div", "msg " + kind);
    row.appendChild(el("div", "text", text));
    if (meta) {
      row.appendChild(el("div", "meta", meta));
    }
    return row;
  }

  function render() {
    var rows = [];
    var shownIds = new Set();
    Array.from(entries.keys())
      .sort(function (a, b) {
        return a - b;
      })
      .forEach(function (seq) {
        var m = entries.get(seq);
        if (m.kind === "customer") {
          shownIds.add(m.id);
          rows.push(bubble("customer", m.text || "", t.you));
        } else if (m.kind === "reply") {
          rows.push(bubble("agent", m.text || "", t.agent));
        } else if (m.kind === "ack") {
          rows.push(
            bubble(
              "notice",
              typeof m.minutes === "number" ? t.ack(m.minutes, m.ticket) : t.received(m.ticket)
            )
          );
        }
      });
    state.outgoing.forEach(function (o) {
      if (!shownIds.has(o.id)) {
        rows.push(bubble("customer pending", o.text, o.error || t.sending));
      }
    });
    if (!rows.length) {
      rows.push(bubble("notice", t.empty));
    }
    while (log.firstChild) {
      log.removeChild(log.firstChild);
    }
    rows.forEach(function (row) {
      log.appendChild(row);
    });
    log.scrollTop = log.scrollHeight;
  }

  // -- the connection -----------------------------------------------------------------

  var ws = null;
  var ready = false;
  var attempts = 0;
  var maxChars = 10000;
  var retryTimer = null;

  function socketUrl() {
    var url = new URL("v1/widget/ws", base);
    url.protocol = base.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("handle", state.handle);
    if (state.token) {
      url.searchParams.set("conversation", state.token);
      // What this page has already shown: a fresh page asks for the whole history, a
      // reconnect only for what it missed.
      url.searchParams.set("since", String(lastSeq));
    }
    return url.href;
  }

  function connect() {
    ready = false;
    status.textContent = attempts ? t.offline : t.connecting;
    status.hidden = false;
    try {
      ws = new WebSocket(socketUrl());
    } catch (e) {
      scheduleReconnect();
      return;
    }
    ws.onmessage = function (event) {
      var frame;
      try {
        frame = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      onFrame(frame);
    };
    ws.onclose = function (event) {
      if (event.code === 1009 && state.outgoing.length) {
        // Too big for the server: resending it would only be refused again.
        var last = state.outgoing[state.outgoing.length - 1];
        last.failed = true;
        last.error = t.failed + ": " + t.tooLong(maxChars);
        save();
        render();
      }
      ws = null;
      ready = false;
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    if (retryTimer) {
      return;
    }
    status.textContent = t.offline;
    status.hidden = false;
    // Exponential backoff with jitter, so a restarted server is not hit by every page at once.
    var delay = Math.min(MAX_BACKOFF_MS, 500 * Math.pow(2, attempts)) * (0.5 + Math.random() / 2);
    attempts += 1;
    retryTimer = window.setTimeout(function () {
      retryTimer = null;
      connect();
    }, delay);
  }

  function keep(m) {
    if (typeof m.seq !== "number") {
      return;
    }
    entries.set(m.seq, m);
    if (m.seq > lastSeq) {
      lastSeq = m.seq;
    }
    if (m.kind === "customer") {
      state.outgoing = state.outgoing.filter(function (o) {
        return o.id !== m.id;
      });
    }
  }

  function onFrame(frame) {
    if (frame.type === "history") {
      (frame.messages || []).forEach(keep);
    } else if (frame.type === "message") {
      keep(frame);
    } else if (frame.type === "ready") {
      ready = true;
      attempts = 0;
      maxChars = frame.max_text_chars || maxChars;
      status.hidden = true;
      flush();
    } else if (frame.type === "accepted") {
      if (frame.conversation && frame.conversation !== state.token) {
        state.token = frame.conversation;
      }
    } else if (frame.type === "error") {
      onError(frame);
    }
    save();
    render();
  }

  function onError(frame) {
    var item = state.outgoing.find(function (o) {
      return o.id === frame.id;
    });
    if (frame.code === "rate_limited" || frame.code === "unavailable") {
      status.textContent = t.slowDown;
      status.hidden = false;
      window.setTimeout(flush, 1000 * (frame.retry_after || 2));
      return;
    }
    if (frame.code === "invalid_conversation_token") {
      state.token = null; // a token from another installation: start afresh
    }
    if (item) {
      item.error = t.failed + ": " + (frame.message || frame.code);
      item.failed = true;
    }
  }

  function flush() {
    if (!ws || !ready || ws.readyState !== WebSocket.OPEN) {
      return;
    }
    state.outgoing.forEach(function (o) {
      if (!o.failed) {
        // The same id on every resend: the server stores the message once.
        ws.send(JSON.stringify({ type: "message", id: o.id, text: o.text }));
      }
    });
    status.hidden = true;
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var text = input.value.trim();
    if (!text) {
      return;
    }
    if (text.length > maxChars) {
      status.textContent = t.tooLong(maxChars);
      status.hidden = false;
      return;
    }
    state.outgoing.push({ id: randomId(), text: text });
    input.value = "";
    save();
    render();
    flush();
  });
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  function start() {
    document.body.appendChild(host);
    setOpen(Boolean(state.open));
    render();
    connect();
  }

  if (document.body) {
    start();
  } else {
    document.addEventListener("DOMContentLoaded", start);
  }
})();
