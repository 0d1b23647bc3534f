/* The contact form: posts with fetch (multipart), shows the ticket number and status link. */
(function () {
  "use strict";

  var zh = (document.documentElement.lang || navigator.language || "").toLowerCase().indexOf("zh") === 0 ||
    (navigator.language || "").toLowerCase().indexOf("zh") === 0;
  var TEXT = zh
    ? {
        title: "联系我们", name: "姓名", contact: "邮箱或电话", message: "留言",
        attachment: "附件（可选）", send: "提交", sending: "提交中…",
        done: "已收到，工单号 ", status: "查看工单状态", failed: "提交失败：",
      }
    : {
        title: "Contact us", name: "Your name", contact: "E-mail or phone", message: "Message",
        attachment: "Attachment (optional)", send: "Send", sending: "Sending…",
        done: "Thank you. Your ticket number is ", status: "See the ticket status", failed: "Not sent: ",
      };

  function init() {
    if (zh) {
      document.documentElement.lang = "zh";
      document.querySelectorAll("[data-t]").forEach(function (node) {
        var key = node.getAttribute("data-t");
        if (TEXT[key] && key !== "attachment") {
          node.textContent = TEXT[key];
        }
      });
    }
    var form = document.getElementById("contact");
    var result = document.getElementById("result");
    var key = null;
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var button = form.querySelector("button");
      var data = new FormData(form);
      data.set("language", zh ? "zh" : "en");
      // One key per filled-in form: pressing Send again after a lost answer is a no-op.
      key = key || (window.crypto.randomUUID ? window.crypto.randomUUID() : String(Date.now()));
      data.set("idempotency_key", key);
      button.disabled = true;
      button.textContent = TEXT.sending;
      fetch(form.action, { method: "POST", body: data, credentials: "same-origin" })
        .then(function (response) {
          return response.json().then(function (body) {
            return { ok: response.ok, body: body };
          });
        })
        .then(function (answer) {
          result.hidden = false;
          while (result.firstChild) {
            result.removeChild(result.firstChild);
          }
          if (answer.ok) {
            result.className = "ok";
            result.appendChild(document.createTextNode(TEXT.done));
            var ticket = document.createElement("strong");
            ticket.id = "ticket";
            ticket.textContent = answer.body.ticket;
            result.appendChild(ticket);
            result.appendChild(document.createTextNode(". "));
            var link = document.createElement("a");
            link.id = "status-link";
            link.href = answer.body.status_url;
            link.textContent = TEXT.status;
            result.appendChild(link);
            form.hidden = true;
          } else {
            result.className = "error";
            result.textContent = TEXT.failed + ((answer.body.error || {}).message || "error");
            if ((answer.body.error || {}).code !== "rate_limited") {
              key = null; // the form must change before it can go through
            }
          }
        })
        .catch(function () {
          result.hidden = false;
          result.className = "error";
          result.textContent = TEXT.failed + "network";
        })
        .then(function () {
          button.disabled = false;
          button.textContent = TEXT.send;
        });
    });
  }

  init();
})();
