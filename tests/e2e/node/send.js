// The seed's Nodemailer example, with host, port and CA file from the
// environment.  Prints one JSON line: {ok, messageId, response} or
// {ok: false, code, responseCode, response}.
'use strict';
const fs = require('fs');
const nodemailer = require('nodemailer');

const env = process.env;
const transporter = nodemailer.createTransport({
  host: env.SMTP_HOST,
  port: Number(env.SMTP_PORT),
  secure: env.SMTP_SECURE === 'true', // true for 465, false for 587 + STARTTLS
  requireTLS: env.SMTP_SECURE !== 'true',
  auth: { user: env.SMTP_USER, pass: env.SMTP_PASS },
  tls: { ca: fs.readFileSync(env.SMTP_CA) },
});

async function main() {
  try {
    const info = await transporter.sendMail({
      from: `"Your Name" <${env.MAIL_FROM}>`,
      to: env.MAIL_TO,
      subject: 'Hello from Nodemailer',
      text: 'Hello world! This is a test email sent using Nodemailer.',
      html: '<b>Hello world!</b> This is a test email sent using Nodemailer.',
    });
    console.log(JSON.stringify({ ok: true, messageId: info.messageId, response: info.response }));
  } catch (error) {
    console.log(JSON.stringify({
      ok: false, code: error.code, responseCode: error.responseCode, response: error.response,
    }));
  }
}

main();
